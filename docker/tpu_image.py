"""Puts libtpu where TensorFlow finds it in the TPU trainer image, and checks the built image.

TensorFlow 2.16 opens the TPU runtime from $TPU_LIBRARY_PATH, else as `libtpu.so` through the
dynamic loader's search path (/lib, /usr/lib, ...); it never looks inside site-packages, where
pip installs the `libtpu` wheel that tensorflow-tpu depends on. Vertex AI's custom-container
recipe for TPU VMs therefore asks for /lib/libtpu.so. docker/Dockerfile.tpu runs:

  python docker/tpu_image.py install-libtpu   # copy the wheel's libtpu.so to /lib
  python docker/tpu_image.py check            # fail the build unless the layout is right

and on a TPU VM (the smoke job in docs/cloud.md) the same image runs:

  python /simclr/docker/tpu_image.py smoke    # TensorFlow sees and computes on every core

Each failure is one line on stderr and exit status 1. Only the standard library is imported,
except by `smoke`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence

LIBTPU_IN_IMAGE = "/lib/libtpu.so"
LIBTPU_DISTRIBUTIONS = ("libtpu", "libtpu-nightly")
TF_DISTRIBUTION = "tensorflow-tpu"
# Distributions that ship their own `tensorflow` module and would overwrite the TPU build's.
OTHER_TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel")


class ImageError(RuntimeError):
    """The image's TPU layout is wrong; the message is one line."""


def _installed(name: str, site: Sequence[str] | None) -> list[metadata.Distribution]:
    where = {"path": list(site)} if site else {}
    return list(metadata.distributions(name=name, **where))


def _distribution(names: Sequence[str], site: Sequence[str] | None) -> metadata.Distribution:
    for name in names:
        found = _installed(name, site)
        if found:
            return found[0]
    raise ImageError(f"none of {', '.join(names)} is installed")


def wheel_libtpu(site: Sequence[str] | None = None) -> pathlib.Path:
    """The libtpu.so that the installed libtpu wheel put into site-packages."""
    dist = _distribution(LIBTPU_DISTRIBUTIONS, site)
    files = [f for f in dist.files or () if f.name == "libtpu.so"]
    if len(files) != 1:
        name = f"{dist.metadata['Name']} {dist.version}"
        raise ImageError(f"{name} lists {len(files)} libtpu.so files, expected 1")
    path = pathlib.Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise ImageError(f"{path} is listed by {dist.metadata['Name']} but missing")
    return path


def _in_root(root: str, path: str) -> pathlib.Path:
    return pathlib.Path(root) / path.lstrip("/")


def install_libtpu(root: str = "/", site: Sequence[str] | None = None) -> pathlib.Path:
    """Copies the wheel's libtpu.so to /lib/libtpu.so (under `root`)."""
    source = wheel_libtpu(site)
    target = _in_root(root, LIBTPU_IN_IMAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o755)
    return target


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _required_libtpu(tf_dist: metadata.Distribution) -> str | None:
    """The libtpu version tensorflow-tpu pins (Requires-Dist: libtpu ==X), if it pins one."""
    for requirement in tf_dist.requires or ():
        match = re.match(r"^(libtpu(?:-nightly)?)\s*\(?\s*==\s*([^\s;)]+)", requirement)
        if match:
            return match.group(2)
    return None


def check(
    root: str = "/", site: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> list[str]:
    """Checks the image layout; returns what was verified, raises ImageError on the first fault.

    - /lib/libtpu.so exists, is an ELF shared object, and is byte-identical to the wheel's;
    - TPU_LIBRARY_PATH names it (TensorFlow's first choice, so a stray libtpu.so elsewhere on
      the loader path cannot win);
    - tensorflow-tpu is installed and no other TensorFlow distribution overwrote its module;
    - the libtpu wheel is the version tensorflow-tpu pins.
    """
    environ = dict(os.environ if environ is None else environ)
    done = []
    lib = _in_root(root, LIBTPU_IN_IMAGE)
    if not lib.is_file():
        raise ImageError(f"{LIBTPU_IN_IMAGE} is missing (run `tpu_image.py install-libtpu`)")
    with lib.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            raise ImageError(f"{LIBTPU_IN_IMAGE} is not an ELF shared object")
    wheel = wheel_libtpu(site)
    if lib.stat().st_size != wheel.stat().st_size or _sha256(lib) != _sha256(wheel):
        raise ImageError(f"{LIBTPU_IN_IMAGE} differs from the installed wheel's {wheel}")
    done.append(f"{LIBTPU_IN_IMAGE}: ELF, {lib.stat().st_size} bytes, same as {wheel}")

    if environ.get("TPU_LIBRARY_PATH") != LIBTPU_IN_IMAGE:
        raise ImageError(
            f"TPU_LIBRARY_PATH is {environ.get('TPU_LIBRARY_PATH')!r}, expected "
            f"{LIBTPU_IN_IMAGE!r} (ENV in docker/Dockerfile.tpu)"
        )
    done.append(f"TPU_LIBRARY_PATH={LIBTPU_IN_IMAGE}")

    tf_dist = _distribution((TF_DISTRIBUTION,), site)
    for name in OTHER_TF_DISTRIBUTIONS:
        if _installed(name, site):
            raise ImageError(f"{name} is installed next to {TF_DISTRIBUTION}; uninstall it")
    libtpu_dist = _distribution(LIBTPU_DISTRIBUTIONS, site)
    pinned = _required_libtpu(tf_dist)
    if pinned is not None and pinned != libtpu_dist.version:
        raise ImageError(
            f"{TF_DISTRIBUTION} {tf_dist.version} pins libtpu {pinned}, found {libtpu_dist.version}"
        )
    done.append(
        f"{TF_DISTRIBUTION} {tf_dist.version} with {libtpu_dist.metadata['Name']} "
        f"{libtpu_dist.version}"
    )
    return done


def smoke() -> str:
    """On a TPU VM: TensorFlow initializes the TPU system and runs a step on every core."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    cores = tf.config.list_logical_devices("TPU")
    if not cores:
        raise ImageError("TensorFlow found no TPU cores")
    strategy = tf.distribute.TPUStrategy(resolver)

    @tf.function
    def step() -> tf.Tensor:
        def per_core() -> tf.Tensor:
            x = tf.ones([128, 128], tf.bfloat16)
            return tf.reduce_sum(tf.cast(tf.matmul(x, x), tf.float32))

        return strategy.reduce("SUM", strategy.run(per_core), axis=None)

    total = float(step())
    expected = 128.0 * 128 * 128 * strategy.num_replicas_in_sync
    if total != expected:
        raise ImageError(f"TPU matmul sum {total} != {expected}")
    return (
        f"TensorFlow {tf.__version__}: {len(cores)} TPU cores "
        f"({cores[0].name} ...), {strategy.num_replicas_in_sync} replicas computed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpu_image.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("install-libtpu", "check", "smoke"))
    parser.add_argument("--root", default="/", help="Filesystem root of the image (tests).")
    parser.add_argument(
        "--site", action="append", help="Where installed distributions are (default sys.path)."
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "install-libtpu":
            print(f"installed {install_libtpu(args.root, args.site)}")
        elif args.command == "check":
            for line in check(args.root, args.site):
                print(f"ok: {line}")
        else:
            print(f"ok: {smoke()}")
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - TensorFlow raises many types; report one line.
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
