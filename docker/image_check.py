"""Build-time checks that an image runs what its steps run, and changes only what it says.

The three Dockerfiles run, in order:

  python docker/image_check.py freeze BASE            # the base image's distributions
  python docker/image_check.py constraints BASE PROJECT OUT
      # pins for pip: the base image's version of every distribution it ships, the project's
      # (constraints.txt) for the rest, so installing what the base lacks cannot upgrade what
      # it has (keras, wrapt, grpcio, packaging were seen moving under `-c constraints.txt`)
  pip install -c OUT ...
  python docker/image_check.py unchanged BASE [--allow NAME=REASON ...]
      # fails unless every distribution of the base image is still there at its version, but
      # for the ones named with the reason the change is safe; lists every change
  python docker/image_check.py imports               # every module a step imports
  python docker/image_check.py device gpu|tpu        # one tiny step where the device is present

Each failure is one line on stderr and exit status 1. `freeze`, `constraints` and `unchanged`
import only the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import pathlib
import pkgutil
import re
import sys
from collections.abc import Sequence
from typing import Any

# What the steps import: TFX's executors and entry points and the libraries their components
# load (Transform, TFMA, TFDV, Beam, tfx-bsl), and this project's packages, module by module.
LIBRARY_MODULES = (
    "tensorflow",
    "tf_keras",
    "tfx",
    "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor",
    "tfx.scripts.run_executor",
    "tfx.components.trainer.executor",
    "tfx.components.transform.executor",
    "tfx.components.evaluator.executor",
    "tfx.components.statistics_gen.executor",
    "tfx.extensions.google_cloud_ai_platform.trainer.executor",
    "tfx.extensions.google_cloud_ai_platform.pusher.executor",
    "tensorflow_transform",
    "tensorflow_transform.beam",
    "tensorflow_model_analysis",
    "tensorflow_data_validation",
    "tfx_bsl",
    "apache_beam",
    "apache_beam.runners.dataflow.dataflow_runner",
    "google.cloud.aiplatform",
    "PIL.Image",
)
PROJECT_PACKAGES = ("pipeline", "models", "transform")


class ImageError(RuntimeError):
    """The image is not what its steps need; the message is one line."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(site: Sequence[str] | None = None) -> dict[str, str]:
    """Canonical distribution name -> version, of `site` (default: this interpreter's path)."""
    where = {"path": list(site)} if site else {}
    found: dict[str, str] = {}
    for dist in metadata.distributions(**where):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return found


def read_pins(path: str) -> dict[str, str]:
    """`name==version` lines (comments, blanks and other specifiers ignored)."""
    pins = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[_canonical(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def write_pins(pins: dict[str, str], path: str) -> None:
    pathlib.Path(path).write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))


def merged_constraints(base: dict[str, str], project: dict[str, str]) -> dict[str, str]:
    """The base image's versions for what it ships, the project's pins for the rest."""
    return {**project, **base}


def changes(base: dict[str, str], now: dict[str, str]) -> list[str]:
    """How the distributions of `base` differ in `now` ('x 1.0 -> 2.0', 'x 1.0 removed')."""
    out = []
    for name, version in sorted(base.items()):
        if name not in now:
            out.append(f"{name} {version} removed")
        elif now[name] != version:
            out.append(f"{name} {version} -> {now[name]}")
    return out


def check_unchanged(
    base: dict[str, str], now: dict[str, str], allowed: dict[str, str]
) -> list[str]:
    """Raises unless every change of a base distribution is allowed; returns the lines that
    report the allowed ones with their reasons."""
    report, refused = [], []
    for change in changes(base, now):
        name = change.split(" ", 1)[0]
        if name in allowed:
            report.append(f"changed on purpose: {change} ({allowed[name]})")
        else:
            refused.append(change)
    unused = sorted(set(allowed) - {c.split(" ", 1)[0] for c in changes(base, now)})
    if refused:
        raise ImageError(
            f"the build changed what the base image ships: {', '.join(refused)}; pin them "
            "to the base versions or allow each with --allow NAME=REASON"
        )
    if unused:
        raise ImageError(f"--allow names what did not change: {', '.join(unused)}")
    return report


def project_modules(root: pathlib.Path) -> list[str]:
    """Every module of the project's packages under `root`."""
    names = []
    for package in PROJECT_PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(root / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


def check_imports(modules: Sequence[str]) -> int:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - any failure to import fails the build
            message = " ".join(f"{type(e).__name__}: {e}".split())
            raise ImageError(f"import {name} failed: {message}") from e
    return len(modules)


def check_device(kind: str) -> str:
    """One tiny training step on the device kind, where the build machine has one.

    Without the device (a build machine has no GPU or TPU as a rule) it checks what it can: the
    GPU image's TensorFlow is a CUDA build; `models.strategy.check_accelerator` stops a Trainer
    that starts on a worker without its device.
    """
    import tensorflow as tf

    if kind == "gpu":
        info = tf.sysconfig.get_build_info()
        if not info.get("is_cuda_build"):
            raise ImageError(f"TensorFlow {tf.__version__} in this image is not a CUDA build")
        devices = tf.config.list_logical_devices("GPU")
        if not devices:
            return (
                f"TensorFlow {tf.__version__} built for CUDA {info.get('cuda_version')}, cuDNN "
                f"{info.get('cudnn_version')}; no GPU on the build machine: no device step"
            )
        strategy = tf.distribute.MirroredStrategy()
    else:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except Exception as e:  # noqa: BLE001 - no TPU here; the layout check covers the rest
            return f"no TPU on the build machine ({type(e).__name__}): no device step"
        strategy = tf.distribute.TPUStrategy(resolver)
        devices = tf.config.list_logical_devices("TPU")
    training_step(strategy)
    return f"one training step on {len(devices)} {kind.upper()} device(s)"


def training_step(strategy: Any) -> float:
    """One SGD step of a tiny matmul model on every replica of `strategy`, checked: the loss
    before the step, and the weights after it (every replica's gradient summed)."""
    import tensorflow as tf

    with strategy.scope():
        weight = tf.Variable(tf.ones([8, 8]))

    @tf.function
    def step() -> tf.Tensor:
        def replica() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(tf.ones([4, 8]), weight))
            gradient = tf.distribute.get_replica_context().all_reduce(
                "SUM", tape.gradient(loss, weight)
            )
            weight.assign_sub(0.01 * gradient)
            return loss

        return strategy.reduce("SUM", strategy.run(replica), axis=None)

    replicas = strategy.num_replicas_in_sync
    loss = float(step())
    if loss != 256.0 * replicas:
        raise ImageError(f"the device step computed loss {loss}, expected {256.0 * replicas}")
    expected = 1 - 0.01 * 4 * replicas  # d loss / d w = 4 per entry and replica
    if abs(float(weight.numpy()[0, 0]) - expected) > 1e-5:
        raise ImageError(
            f"the device step left weight {float(weight.numpy()[0, 0])}, expected {expected}"
        )
    return loss


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    freeze = commands.add_parser("freeze")
    freeze.add_argument("out")
    constraints = commands.add_parser("constraints")
    constraints.add_argument("base")
    constraints.add_argument("project")
    constraints.add_argument("out")
    unchanged = commands.add_parser("unchanged")
    unchanged.add_argument("base")
    unchanged.add_argument("--allow", action="append", default=[], metavar="NAME=REASON")
    imports = commands.add_parser("imports")
    imports.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
    device = commands.add_parser("device")
    device.add_argument("kind", choices=("gpu", "tpu"))
    for sub in (freeze, unchanged):
        sub.add_argument("--site", action="append", help="site-packages to read (tests)")
    args = parser.parse_args(argv)
    try:
        if args.command == "freeze":
            write_pins(installed(args.site), args.out)
            print(f"ok: {len(installed(args.site))} distributions in {args.out}")
        elif args.command == "constraints":
            pins = merged_constraints(read_pins(args.base), read_pins(args.project))
            write_pins(pins, args.out)
            print(f"ok: {len(pins)} pins in {args.out}")
        elif args.command == "unchanged":
            allowed = {}
            for item in args.allow:
                name, _, reason = item.partition("=")
                if not reason:
                    raise ImageError(f"--allow {item!r}: give NAME=REASON")
                allowed[_canonical(name)] = reason
            for line in check_unchanged(read_pins(args.base), installed(args.site), allowed):
                print(line)
            print("ok: the base image's distributions are as it ships them")
        elif args.command == "imports":
            sys.path.insert(0, args.root)
            count = check_imports(list(LIBRARY_MODULES) + project_modules(pathlib.Path(args.root)))
            print(f"ok: {count} modules import")
        else:
            print(f"ok: {check_device(args.kind)}")
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
