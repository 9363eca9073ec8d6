"""The class-folder ExampleGen's driver: a listing fingerprint that costs no per-file stat calls
on GCS, changes whenever the data change, and speaks the Vertex pre-cache-check protocol."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import tensorflow as tf
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from tfx.components.example_gen import input_processor
from tfx.dsl.io import fileio
from tfx.orchestration.kubeflow.v2 import compiler_utils
from tfx.orchestration.kubeflow.v2.file_based_example_gen import driver as tfx_vertex_driver
from tfx.proto import example_gen_pb2
from tfx.types import standard_artifacts

from pipeline.components.image_example_gen import driver, make_image_example_gen

SPLITS = {"train": 5, "val": 2}  # files per class folder
CLASSES = ("n01", "n02", "n03")


def write_tree(root: pathlib.Path) -> pathlib.Path:
    for split, count in SPLITS.items():
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{c}_{i}.JPEG").write_bytes(b"x" * (10 + i))
    (root / "train" / ".hidden").mkdir()  # hidden class folder: not ingested, not listed
    (root / "train" / "n01" / ".DS_Store").write_bytes(b"junk")
    return root


def splits_config() -> list[example_gen_pb2.Input.Split]:
    return [example_gen_pb2.Input.Split(name=s, pattern=f"{s}/*/*") for s in SPLITS]


N_FILES = len(CLASSES) * sum(SPLITS.values())


class FakeGcs:
    """`storage.Client.list_blobs` over a local folder standing in for gs://bucket/.

    The generation is the file's mtime in ns, so a rewrite gives a new generation, as on GCS.
    """

    class Pages(list):
        prefixes: set[str]

    class Blob:
        def __init__(self, name: str, path: pathlib.Path):
            stat = path.stat()
            self.name, self.size, self.generation = name, stat.st_size, stat.st_mtime_ns

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def list_blobs(
        self, bucket: str, *, prefix: str, fields: str, delimiter: str | None = None
    ) -> Pages:
        assert bucket == "bucket" and delimiter in ("/", None) and "size" in fields
        self.calls.append((bucket, prefix))
        folder = self.root / prefix
        pages = self.Pages()
        pages.prefixes = set()
        if delimiter is None:  # no delimiter: every object below the prefix, at any depth
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                pages.append(self.Blob(prefix + path.relative_to(folder).as_posix(), path))
            return pages
        for child in sorted(folder.iterdir()):
            if child.is_dir():
                pages.prefixes.add(f"{prefix}{child.name}/")
            else:
                pages.append(self.Blob(prefix + child.name, child))
        return pages


@pytest.fixture
def stat_counter(monkeypatch):
    """Stat calls through TFX's fileio and through TensorFlow's gfile (each one a request on
    GCS); fileio's TensorFlow filesystem calls gfile, so each API is counted on its own."""
    calls: dict[str, list[str]] = {"fileio": [], "gfile": []}
    real = {"fileio": fileio.stat, "gfile": tf.io.gfile.stat}

    def counting(api: str):
        def stat(path):
            calls[api].append(path)
            return real[api](path)

        return stat

    monkeypatch.setattr(fileio, "stat", counting("fileio"))
    monkeypatch.setattr(tf.io.gfile, "stat", counting("gfile"))
    return calls


def _clear(calls: dict[str, list[str]]) -> None:
    for api_calls in calls.values():
        api_calls.clear()


def test_tfx_stats_every_file_while_the_listing_fingerprint_stats_none(tmp_path, stat_counter):
    root = write_tree(tmp_path / "data")
    tfx_processor = input_processor.FileBasedInputProcessor(str(root), splits_config())
    tfx_processor.resolve_span_and_version()
    assert len(stat_counter["fileio"]) == N_FILES + 1  # every matched file, .DS_Store too
    _clear(stat_counter)

    gcs = FakeGcs(tmp_path)
    fingerprint = driver.input_fingerprint(
        "gs://bucket/data", splits_config(), gcs_client_factory=lambda: gcs
    )
    assert stat_counter == {"fileio": [], "gfile": []}
    # One listing of each split folder (its class folders), one of each class folder.
    assert sorted(gcs.calls) == sorted(
        [("bucket", f"data/{s}/") for s in SPLITS]
        + [("bucket", f"data/{s}/{c}/") for s in SPLITS for c in CLASSES]
    )
    train, val = fingerprint.split("\n")
    train_bytes = 3 * (10 + 11 + 12 + 13 + 14)
    assert train.startswith(f"split:train,num_files:{3 * 5},total_bytes:{train_bytes},")
    assert val.startswith(f"split:val,num_files:{3 * 2},total_bytes:{3 * (10 + 11)},")


def test_local_folders_need_no_stat_calls_and_other_filesystems_stat_in_parallel(
    tmp_path, stat_counter
):
    root = write_tree(tmp_path / "data")
    local = driver.input_fingerprint(str(root), splits_config())
    # scandir's directory read carries sizes and mtimes.
    assert stat_counter == {"fileio": [], "gfile": []}

    # ram:// has no listing with sizes: the generic lister stats each file, and only files.
    for path in root.rglob("*"):
        target = f"ram://copy/{path.relative_to(root).as_posix()}"
        if path.is_dir():
            tf.io.gfile.makedirs(target)
        else:
            tf.io.gfile.makedirs(os.path.dirname(target))
            with tf.io.gfile.GFile(target, "wb") as f:
                f.write(path.read_bytes())
    generic = driver.input_fingerprint("ram://copy", splits_config())
    assert sorted(stat_counter["gfile"]) == sorted(
        f"ram://copy/{p.relative_to(root).as_posix()}"
        for p in root.rglob("*.JPEG")
        if ".hidden" not in p.parts
    )
    # Same names and sizes; the versions (mtimes) differ between the two filesystems.
    assert [line.rsplit(",", 1)[0] for line in generic.split("\n")] == [
        line.rsplit(",", 1)[0] for line in local.split("\n")
    ]


def _mutations(root: pathlib.Path):
    """Each change ingestion would see; applied one after another to the same tree."""
    train = root / "train"

    def add():
        (train / "n02" / "n02_9.JPEG").write_bytes(b"new")

    def remove():
        (train / "n03" / "n03_0.JPEG").unlink()

    def rename():
        (train / "n01" / "n01_1.JPEG").rename(train / "n01" / "n01_1b.JPEG")

    def rewrite_same_size():
        path = train / "n01" / "n01_2.JPEG"
        stat = path.stat()
        path.write_bytes(b"y" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    def new_class():
        (train / "n04").mkdir()
        (train / "n04" / "n04_0.JPEG").write_bytes(b"z")

    def move_between_classes():
        (train / "n02" / "n02_0.JPEG").rename(train / "n03" / "n02_0.JPEG")

    return [add, remove, rename, rewrite_same_size, new_class, move_between_classes]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_fingerprint_changes_exactly_when_the_data_change(tmp_path, where):
    root = write_tree(tmp_path / "data")
    gcs = FakeGcs(tmp_path)

    def fingerprint() -> str:
        if where == "local":
            return driver.input_fingerprint(str(root), splits_config())
        return driver.input_fingerprint(
            "gs://bucket/data", splits_config(), gcs_client_factory=lambda: gcs
        )

    seen = [fingerprint()]
    assert fingerprint() == seen[0]  # deterministic despite parallel listing
    (root / "train" / "n01" / ".DS_Store").write_bytes(b"other junk")  # hidden: not ingested
    assert fingerprint() == seen[0]
    for change in _mutations(root):
        change()
        seen.append(fingerprint())
        assert seen[-1] != seen[-2], change.__name__
        assert fingerprint() == seen[-1], change.__name__
    # The eval split was never touched.
    assert len({s.split("\n")[1] for s in seen}) == 1


def test_bad_split_patterns_are_rejected(tmp_path):
    root = write_tree(tmp_path / "data")
    for pattern in ("train/*", "train/*/*.JPEG", "*/*/*"):
        with pytest.raises(ValueError, match="split pattern must be"):
            driver.input_fingerprint(
                str(root), [example_gen_pb2.Input.Split(name="train", pattern=pattern)]
            )


def test_the_component_uses_the_driver_and_keeps_its_id(tmp_path):
    root = write_tree(tmp_path / "data")
    component = make_image_example_gen(str(root), list(SPLITS))
    assert component.id == "FileBasedExampleGen"
    assert component.driver_class is driver.ImageFolderDriver
    resolved = driver.ImageFolderDriver(None).resolve_exec_properties(
        dict(component.exec_properties), None, None
    )
    assert resolved["input_fingerprint"] == driver.input_fingerprint(str(root), splits_config())
    assert (resolved["span"], resolved["version"]) == (0, None)


# ----- the Vertex AI Pipelines pre-cache-check step -----


def _invocation(input_base: str, output_file: str) -> str:
    invocation = pipeline_spec_pb2.ExecutorInput()
    invocation.outputs.output_file = output_file
    params = invocation.inputs.parameter_values
    params["input_base"].string_value = input_base
    params["input_config"].string_value = json_format.MessageToJson(
        example_gen_pb2.Input(splits=splits_config())
    )
    params["output_config"].string_value = "{}"
    invocation.outputs.artifacts["examples"].artifacts.append(
        pipeline_spec_pb2.RuntimeArtifact(
            name="projects/p/locations/l/metadataStores/default/artifacts/1",
            uri="gs://bucket/root/FileBasedExampleGen/examples",
            type=pipeline_spec_pb2.ArtifactTypeSchema(
                instance_schema=compiler_utils.get_artifact_schema(standard_artifacts.Examples)
            ),
        )
    )
    return json_format.MessageToJson(invocation)


def _inputs_spec() -> str:
    spec = pipeline_spec_pb2.ComponentInputsSpec()
    for name in ("input_base", "input_config", "output_config"):
        spec.parameters[name].parameter_type = pipeline_spec_pb2.ParameterType.STRING
    return json_format.MessageToJson(spec)


def test_vertex_step_writes_what_tfx_driver_writes_but_the_fingerprint(tmp_path):
    root = write_tree(tmp_path / "data")
    outputs = {}
    for name, run in (
        ("tfx", lambda argv: tfx_vertex_driver.main(tfx_vertex_driver._parse_flags(argv))),
        ("ours", driver.main),
    ):
        out = tmp_path / name / "executor_output.json"
        # The compiled step passes the Beam arguments too; both drivers ignore them.
        argv = [
            "--json_serialized_invocation_args",
            _invocation(str(root), str(out)),
            "--json_serialized_inputs_spec_args",
            _inputs_spec(),
            "--runner=DataflowRunner",
        ]
        run(argv)
        outputs[name] = json.loads(out.read_text())
    ours, theirs = outputs["ours"], outputs["tfx"]
    fingerprint = driver.input_fingerprint(str(root), splits_config())
    assert ours["parameterValues"]["input_fingerprint"] == fingerprint
    assert theirs["parameterValues"]["input_fingerprint"] != fingerprint
    artifact = ours["artifacts"]["examples"]["artifacts"][0]
    assert artifact["metadata"]["input_fingerprint"] == fingerprint
    assert artifact["metadata"]["custom:span"] == 0
    for output in (ours, theirs):
        del output["parameterValues"]["input_fingerprint"]
        del output["artifacts"]["examples"]["artifacts"][0]["metadata"]["input_fingerprint"]
    assert ours == theirs


def test_vertex_step_command_runs_this_module():
    command = driver.VERTEX_DRIVER_COMMAND
    assert command[:2] == ("python", "-c")
    namespace: dict = {}
    code = command[2].replace("sys.exit(main())", "entry = main")
    exec(code, namespace)  # noqa: S102 - the command's own import line
    assert namespace["entry"] is driver.main


def test_local_dag_runner_records_the_listing_fingerprint(tmp_path):
    """Through LocalDagRunner the component's driver class runs, and its fingerprint lands on
    the Examples artifact (what TFX's cache compares between runs)."""
    import io

    import ml_metadata as mlmd
    from PIL import Image
    from tfx import v1 as tfx

    root = tmp_path / "images"
    for split in ("train", "val"):
        for i, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(buffer, "PNG")
            (root / split / name / f"{name}.png").write_bytes(buffer.getvalue())
    metadata_path = str(tmp_path / "metadata.sqlite")
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="driver-test",
        pipeline_root=str(tmp_path / "root"),
        components=[make_image_example_gen(str(root), ["train", "val"])],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            metadata_path
        ),
        beam_pipeline_args=[],
    )
    tfx.orchestration.LocalDagRunner().run(pipeline)
    store = mlmd.MetadataStore(
        tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
    )
    (examples,) = store.get_artifacts_by_type("Examples")
    splits = [example_gen_pb2.Input.Split(name=s, pattern=f"{s}/*/*") for s in ("train", "val")]
    expected = driver.input_fingerprint(str(root), splits)
    assert examples.custom_properties["input_fingerprint"].string_value == expected
    assert "listing_sha256:" in expected


def test_gcs_lister_through_the_real_storage_client_over_pages():
    """google-cloud-storage's own client against a canned JSON API: the listing asks only for
    what the fingerprint needs, follows page tokens, and collects sub-folders from every page."""
    from urllib.parse import parse_qs, urlparse

    import requests
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    requests_seen = []

    class CannedApi(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            query = parse_qs(urlparse(request.url).query)
            requests_seen.append(query)
            prefix = query["prefix"][0]
            if "pageToken" not in query:
                body = {
                    "items": [
                        {"name": prefix, "size": "0", "generation": "1"},  # folder placeholder
                        {"name": f"{prefix}a.JPEG", "size": "10", "generation": "5"},
                    ],
                    "prefixes": [f"{prefix}nested/"],
                    "nextPageToken": "page2",
                }
            else:
                body = {
                    "items": [{"name": f"{prefix}b.JPEG", "size": "12", "generation": "7"}],
                    "prefixes": [f"{prefix}.hidden/"],
                }
            response = requests.Response()
            response.status_code, response.url = 200, request.url
            response.headers["content-type"] = "application/json"
            response._content = json.dumps(body).encode()
            return response

        def close(self):
            pass

    def client():
        gcs = storage.Client(project="p", credentials=AnonymousCredentials())
        gcs._http.mount("https://", CannedApi())
        return gcs

    lister = driver.GcsLister(client)
    assert lister.entries("gs://bucket/data/train", "n01") == [
        driver.Entry("n01/a.JPEG", 10, "5"),
        driver.Entry("n01/b.JPEG", 12, "7"),
        driver.Entry("n01/nested/", 0, ""),
    ]
    assert [q.get("pageToken") for q in requests_seen] == [None, ["page2"]]
    for query in requests_seen:
        assert query["prefix"] == ["data/train/n01/"] and query["delimiter"] == ["/"]
        assert query["fields"] == ["items(name,size,generation),prefixes,nextPageToken"]
    assert lister.classes("gs://bucket/data/train") == ["nested"]


def write_pool(root: pathlib.Path) -> pathlib.Path:
    for relative, size in (("a.jpg", 3), ("x/y/b.jpg", 4), ("n01/c.jpg", 5)):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"p" * size)
    (root / ".cache").mkdir()
    (root / ".cache" / "d.jpg").write_bytes(b"hidden folder: not ingested")
    return root


@pytest.mark.parametrize("where", ["in_tree", "elsewhere", "gcs", "ram"])
def test_unlabeled_pool_fingerprint_covers_every_depth(tmp_path, where):
    root = write_tree(tmp_path / "data")
    pool = write_pool(root / "unlabeled" if where != "elsewhere" else tmp_path / "photos")
    base, pattern, factory = str(root), "unlabeled/**", None
    if where == "elsewhere":
        pattern = f"{pool}/**"
    elif where == "gcs":
        gcs = FakeGcs(tmp_path)
        base, factory = "gs://bucket/data", lambda: gcs
    elif where == "ram":
        for path in pool.rglob("*"):
            if path.is_file():
                target = f"ram://pool/{path.relative_to(pool).as_posix()}"
                tf.io.gfile.makedirs(os.path.dirname(target))
                with tf.io.gfile.GFile(target, "wb") as f:
                    f.write(path.read_bytes())
        pattern = "ram://pool/**"
    splits = [*splits_config(), example_gen_pb2.Input.Split(name="unlabeled", pattern=pattern)]

    def fingerprint() -> str:
        return driver.input_fingerprint(base, splits, gcs_client_factory=factory)

    first = fingerprint()
    pool_line = first.split("\n")[-1]
    assert pool_line.startswith("split:unlabeled,num_files:3,total_bytes:12,")
    if where == "ram":
        return
    (pool / "x" / "y" / "e.jpg").write_bytes(b"new deep file")
    changed = fingerprint()
    assert changed.split("\n")[-1] != pool_line
    assert changed.split("\n")[:-1] == first.split("\n")[:-1]  # class-folder splits untouched
