"""Single kernels in bfloat16 on this CPU, TensorFlow's own against what the ResNet uses instead:
the blocks' element-wise work (Eigen against XLA) and 3x3 convolutions on narrow maps, each
direction (oneDNN's kernel on the plain maps against the same on the images laid side by side,
`models/side_by_side.py`).

    python bench/cpu_kernels.py --out=output/cpu_kernels

The shapes are those of the CIFAR ResNet-18 step at batch 256 (512 views): element-wise work
on one 512x32x32x64 activation, convolutions with C channels on HxH maps for each --conv_maps
entry HxC. Each kernel runs in its own traced function, --repeats times per round, rounds
alternating. Writes kernels.json and kernels.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import tensorflow as tf  # noqa: E402

from models import cpu_elementwise, side_by_side  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/cpu_kernels")
    p.add_argument("--batch", type=int, default=512, help="Views per step (2 x batch size).")
    p.add_argument("--activation", default="32x64", help="HxC of the element-wise activation.")
    p.add_argument("--conv_maps", default="4x512,8x256,16x128", help="HxC of each convolution.")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _hc(text: str) -> tuple[int, int]:
    h, c = text.split("x")
    return int(h), int(c)


def _tensor(shape: list[int], seed: int, scale: float = 1.0) -> tf.Tensor:
    return tf.cast(tf.random.stateless_normal(shape, [seed, 0]) * scale, tf.bfloat16)


def elementwise_pairs(batch: int, h: int, c: int) -> dict[str, tuple]:
    """name -> (TensorFlow's form, the compiled form, inputs)."""
    a, b, y = (_tensor([batch, h, h, c], seed) for seed in (1, 2, 3))

    def relu_grad(dy, y):
        return tf.raw_ops.ReluGrad(gradients=dy, features=y)

    return {
        "relu(x + shortcut)": (lambda a, b: tf.nn.relu(a + b), cpu_elementwise._add_relu, (a, b)),
        "ReLU gradient": (relu_grad, cpu_elementwise._relu_grad, (a, y)),
        "gradient sum, then ReLU gradient": (
            lambda a, b, y: relu_grad(a + b, y),
            cpu_elementwise._sum_relu_grad,
            (a, b, y),
        ),
    }


def conv_pairs(batch: int, h: int, c: int) -> dict[str, tuple]:
    """name -> (oneDNN's kernel on the plain maps, the same on the images side by side,
    inputs) for each direction of a 3x3 stride-1 SAME convolution, whatever width the model
    itself lays side by side (`side_by_side.MAX_WIDTH`, `MAX_FORWARD_WIDTH`)."""
    x, dy = _tensor([batch, h, h, c], 4), _tensor([batch, h, h, c], 5)
    w = _tensor([3, 3, c, c], 6, scale=0.05)
    side_by_side.set_max_width(h)
    try:
        lay = side_by_side.layout(x.shape, 3, 1, "SAME")
    finally:
        side_by_side.set_max_width(side_by_side.MAX_WIDTH)
    if lay is None:
        raise ValueError(f"{h}x{h}x{c} at batch {batch} cannot be laid side by side")
    strides = [1, 1, 1, 1]
    row_width = lay.g * lay.block + lay.tail

    def rows(t):
        return side_by_side.to_rows(t, lay.g, lay.block, lay.tail)

    def unrows(t):
        return side_by_side.from_rows(t, lay.g, lay.block, h, lay.tail)

    def input_grad(dy, w, shape):
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=shape, filter=w, out_backprop=dy, strides=strides, padding="SAME"
        )

    def kernel_grad(x, dy):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[3, 3, c, c], out_backprop=dy, strides=strides, padding="SAME"
        )

    return {
        f"{h}x{h}x{c} forward": (
            lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"),
            lambda x, w: unrows(tf.nn.conv2d(rows(x), w, 1, "SAME")),
            (x, w),
        ),
        f"{h}x{h}x{c} input gradient": (
            lambda dy, w: input_grad(dy, w, [batch, h, h, c]),
            lambda dy, w: unrows(input_grad(rows(dy), w, [batch // lay.g, h, row_width, c])),
            (dy, w),
        ),
        f"{h}x{h}x{c} kernel gradient": (
            kernel_grad,
            lambda x, dy: kernel_grad(rows(x), rows(dy)),
            (x, dy),
        ),
    }


def time_ms(fn, args: tuple, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    out.numpy()
    return 1000 * (time.perf_counter() - start) / repeats


def measure(pairs: dict[str, tuple], rounds: int, repeats: int) -> list[dict]:
    """Both forms of each pair, traced once and run once untimed, then alternated; the largest
    difference between the two forms' results (relative to the largest value) is kept too."""
    rows = []
    for name, (theirs, ours, args) in pairs.items():
        theirs, ours = tf.function(theirs), tf.function(ours)
        a, b = tf.cast(theirs(*args), tf.float32), tf.cast(ours(*args), tf.float32)
        diff = float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(a)))
        times: dict[str, list[float]] = {"tensorflow": [], "replacement": []}
        for _ in range(rounds):
            times["tensorflow"].append(time_ms(theirs, args, repeats))
            times["replacement"].append(time_ms(ours, args, repeats))
        rows.append({"kernel": name, "ms": times, "max_relative_difference": diff})
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"bfloat16, {args.batch} views; ms per call, each round of {args.repeats} calls.",
        "",
        "| kernel | TensorFlow's (Eigen / oneDNN) | replacement (XLA / side by side) "
        "| max rel. diff. |",
        "|---|---|---|---|",
    ]
    for r in rows:
        theirs = " / ".join(f"{t:.1f}" for t in r["ms"]["tensorflow"])
        ours = " / ".join(f"{t:.1f}" for t in r["ms"]["replacement"])
        lines.append(f"| {r['kernel']} | {theirs} | {ours} | {r['max_relative_difference']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    pairs = elementwise_pairs(args.batch, *_hc(args.activation))
    for spec in filter(None, args.conv_maps.split(",")):
        pairs.update(conv_pairs(args.batch, *_hc(spec)))
    rows = measure(pairs, args.rounds, args.repeats)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows, args)
    (out / "kernels.md").write_text(text)
    print(text, flush=True)
    return rows


if __name__ == "__main__":
    main()
