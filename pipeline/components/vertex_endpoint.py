"""The Vertex AI endpoint Pusher: deploy the blessed model, then undeploy the ones it replaces.

TFX's Vertex Pusher uploads each blessed model and deploys it to the endpoint at 100% traffic,
but leaves every earlier deployment in place with 0% traffic. Each deployed model keeps its own
machines (`--serving_machine_type`, min replicas 1) and bills them around the clock, so after N
blessed runs the endpoint costs N times what it serves. This executor undeploys the endpoint's
models that this pipeline deployed before, once the new one is deployed (custom_config
`undeploy_previous`, on unless `--keep_previous_deployments`). An endpoint's display name is not
unique to a pipeline, so each model this Pusher deploys is labelled `simclr-pipeline=<pipeline
name>` in the Model Registry, and only models carrying this pipeline's label are undeployed;
another pipeline's models, or ones deployed by hand, stay. Undeployed models stay in the Model
Registry, which costs nothing beyond their files on GCS, so an earlier model can be deployed
again by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import logging
from tfx import types
from tfx.dsl.components.base import executor_spec
from tfx.extensions.google_cloud_ai_platform import constants
from tfx.extensions.google_cloud_ai_platform.pusher import component as vertex_pusher
from tfx.extensions.google_cloud_ai_platform.pusher import executor as vertex_executor
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import json_utils

UNDEPLOY_PREVIOUS_KEY = "undeploy_previous"
PIPELINE_KEY = "pipeline_name"
OWNER_LABEL = "simclr-pipeline"


def _model_id(resource_name: str) -> str:
    """'projects/P/locations/L/models/ID@version' -> 'L/ID': one model whatever its version
    or whether the project is named by number or id."""
    path = resource_name.split("@", 1)[0]
    location = path.split("/locations/", 1)[-1].split("/", 1)[0]
    return f"{location}/{path.rsplit('/models/', 1)[-1]}"


def _model_labels(resource_name: str) -> dict[str, str]:
    from google.cloud import aiplatform

    return dict(aiplatform.Model(resource_name).labels or {})


def _label_model(resource_name: str, labels: dict[str, str]) -> None:
    from google.cloud import aiplatform

    model = aiplatform.Model(resource_name)
    model.update(labels={**(model.labels or {}), **labels})


def undeploy_all_but(
    endpoint: Any,
    model_resource_name: str,
    owner: str,
    labels_of: Callable[[str], dict[str, str]] | None = None,
) -> list[str]:
    """Undeploys every model on `endpoint` labelled `OWNER_LABEL=owner`, except
    `model_resource_name`; returns the undeployed DeployedModel ids. `endpoint` is an
    `aiplatform.Endpoint`; `labels_of` reads a model's labels (the Model Registry's)."""
    labels_of = labels_of or _model_labels
    keep = _model_id(model_resource_name)
    deployed = endpoint.list_models()
    if not any(_model_id(d.model) == keep for d in deployed):
        raise RuntimeError(
            f"{model_resource_name} is not deployed to {endpoint.resource_name}; "
            "left its other models in place"
        )
    undeployed = []
    for d in deployed:
        if _model_id(d.model) == keep:
            continue
        if labels_of(d.model).get(OWNER_LABEL) != owner:
            logging.info("Keeping %s (%s): not deployed by pipeline %s", d.id, d.model, owner)
            continue
        logging.info("Undeploying %s (%s) from %s", d.id, d.model, endpoint.resource_name)
        endpoint.undeploy(deployed_model_id=d.id, sync=True)
        undeployed.append(d.id)
    return undeployed


def _find_endpoint(display_name: str, model_resource_name: str) -> Any:
    """The endpoint of that display name that serves the model (display names can repeat)."""
    from google.cloud import aiplatform

    keep = _model_id(model_resource_name)
    candidates = aiplatform.Endpoint.list(filter=f'display_name="{display_name}"')
    for endpoint in candidates:
        if any(_model_id(d.model) == keep for d in endpoint.list_models()):
            return endpoint
    raise RuntimeError(f"no endpoint named {display_name!r} serves {model_resource_name}")


class Executor(vertex_executor.Executor):
    """TFX's Vertex Pusher executor, plus undeploying the models the new one replaces."""

    def Do(
        self,
        input_dict: dict[str, list[types.Artifact]],
        output_dict: dict[str, list[types.Artifact]],
        exec_properties: dict[str, Any],
    ) -> None:
        super().Do(input_dict, output_dict, exec_properties)
        custom_config = json_utils.loads(
            exec_properties.get(standard_component_specs.CUSTOM_CONFIG_KEY, "null")
        )
        if not custom_config.get(UNDEPLOY_PREVIOUS_KEY, True):
            return
        pushed = artifact_utils.get_single_instance(
            output_dict[standard_component_specs.PUSHED_MODEL_KEY]
        )
        if not pushed.get_int_custom_property("pushed"):
            return  # not blessed: nothing new was deployed
        model = pushed.get_string_custom_property("pushed_destination")
        serving = custom_config[constants.SERVING_ARGS_KEY]
        owner = custom_config[PIPELINE_KEY]
        from google.cloud import aiplatform

        aiplatform.init(
            project=serving.get("project_id") or serving.get("project"),
            location=custom_config[constants.VERTEX_REGION_KEY],
        )
        endpoint = _find_endpoint(serving["endpoint_name"], model)
        try:
            _label_model(model, {OWNER_LABEL: owner})
            undeployed = undeploy_all_but(endpoint, model, owner)
        except Exception as e:
            raise RuntimeError(
                f"deployed {model} to {endpoint.resource_name} but could not undeploy the "
                f"earlier models of pipeline {owner} ({type(e).__name__}: "
                f"{' '.join(str(e).split())}); undeploy them with "
                "`gcloud ai endpoints undeploy-model`, they bill until then"
            ) from e
        logging.info(
            "Endpoint %s serves %s; undeployed pipeline %s's earlier models %s",
            endpoint.resource_name,
            model,
            owner,
            undeployed or "nothing",
        )


class EndpointPusher(vertex_pusher.Pusher):
    """TFX's Vertex AI Pusher running `Executor` (deploy, then undeploy the rest)."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)
