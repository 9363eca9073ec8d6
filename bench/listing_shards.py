"""Peak memory and time of the class-folder ExampleGen's listing and ordering stage at ImageNet
size, on a synthetic listing (paths only, no image files).

    python bench/listing_shards.py                       # 1,000 classes x 1,300 paths, both
    python bench/listing_shards.py --classes=100 --per_class=1300 --variants=shards

`tf.io.gfile.listdir` answers with synthetic file names under a synthetic root, so the stage
runs the ExampleGen's own listing function (`_list_class_files`, one Beam element per class
folder) through the filesystem interface it uses on GCS, without 1.3 M files on disk. Then:

- `shards`: the current ordering, `SeededShards` (bounded shards of `SHARD_FILES` paths);
- `one_list`: the ordering before it, every path of the split gathered into one element
  (`beam.combiners.ToList`) and shuffled with the same seed (written out here, since the
  executor no longer has it).

Both end in a count of the ordered entries (nothing is read). Each variant runs in its own
process on Beam's local runner (the one `local_runner.py` uses); reported per variant, as JSON:
wall seconds of the pipeline, the process's peak RSS before the pipeline (imports) and at its
end, and the most paths one element held (with the MiB of their path strings alone, before
any encoding overhead).
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import pathlib
import random
import resource
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOT = "/synthetic-imagenet/train"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, classes: int, per_class: int) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    import apache_beam as beam
    import tensorflow as tf

    from pipeline.components.image_example_gen import executor

    real_listdir = tf.io.gfile.listdir

    def listdir(path: str) -> list[str]:
        if not path.startswith(ROOT):
            return real_listdir(path)
        synset = path.rstrip("/").rsplit("/", 1)[-1]
        return [f"{synset}_{i}.JPEG" for i in range(per_class)]

    tf.io.gfile.listdir = listdir
    entries = [(f"n{c:08d}", f"{ROOT}/n{c:08d}") for c in range(classes)]
    largest = f"{pathlib.Path(os.environ.get('TMPDIR', '/tmp'))}/listing_shards_{os.getpid()}"

    def record_size(size: int, text_bytes: int = 0) -> None:  # runs here (local runner)
        with open(largest, "a") as f:
            f.write(f"{size} {text_bytes}\n")

    def text_bytes(entries: list) -> int:
        return sum(len(part) for entry in entries for part in entry)

    def one_list_order(all_entries: list) -> list:
        record_size(len(all_entries), text_bytes(all_entries))
        ordered = sorted(all_entries)
        random.Random(executor.ORDER_SEED).shuffle(ordered)
        return ordered

    def sized_shard(shard: tuple) -> list:
        values = list(shard[1])
        record_size(len(values), text_bytes([entry for _, entry in values]))
        return list(executor._in_seeded_order((shard[0], values)))

    before = _peak_rss_mib()
    started = time.perf_counter()
    with beam.Pipeline() as p:
        files = p | beam.Create(entries) | beam.FlatMap(executor._list_class_files, None)
        if variant == "one_list":
            ordered = files | beam.combiners.ToList() | beam.FlatMap(one_list_order)
        else:
            total = files | "CountFiles" >> beam.combiners.Count.Globally()
            ordered = (
                files
                | beam.Map(executor._to_shard, beam.pvalue.AsSingleton(total), executor.SHARD_FILES)
                | beam.GroupByKey()
                | beam.FlatMap(sized_shard)
            )
        _ = ordered | beam.combiners.Count.Globally() | beam.Map(record_size)
    seconds = time.perf_counter() - started
    rows = [tuple(map(int, line.split())) for line in open(largest).read().splitlines()]
    os.remove(largest)
    *elements, (count, _) = rows
    return {
        "variant": variant,
        "paths": count,
        "expected_paths": classes * per_class,
        "seconds": round(seconds, 1),
        "peak_rss_mib_after_imports": round(before),
        "peak_rss_mib": round(_peak_rss_mib()),
        "largest_element_paths": max(size for size, _ in elements),
        "largest_element_path_mib": round(max(b for _, b in elements) / 2**20, 1),
        "elements": len(elements),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per_class", type=int, default=1300)
    parser.add_argument("--variants", default="shards,one_list")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.classes, args.per_class)))
        return
    cpu = open("/proc/cpuinfo").read()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpu.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    print(
        json.dumps(
            {
                "cpu": model,
                "amx_bf16": "amx_bf16" in cpu,
                "cores": os.cpu_count(),
                "load_1min": os.getloadavg()[0],
            }
        )
    )
    for variant in args.variants.split(","):
        command = [
            sys.executable,
            __file__,
            f"--one={variant}",
            f"--classes={args.classes}",
            f"--per_class={args.per_class}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(json.dumps({"variant": variant, "error": result.stderr.strip()[-2000:]}))
            continue
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
