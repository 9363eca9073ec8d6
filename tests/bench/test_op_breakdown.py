"""The profiler's op breakdown on a hand-made trace: self times, asynchronous calls, the parts."""

from __future__ import annotations

import pytest
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from bench import op_breakdown as ob

MS = 10**9  # picoseconds


def _space() -> xplane_pb2.XSpace:
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = [
        "ExecutorState::Process",
        "sim_clr_model/conv/Conv2D:_MklNativeConv2D",
        "gradient_tape/conv/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter",
        "loss/call:StatefulPartitionedCall",
        "loss/call/Relu:Relu",
        "ExecutorState::ProcessAsync::Start",
        "LARS/mul:Mul",
    ]
    for i, name in enumerate(names, start=1):
        plane.event_metadata[i].id = i
        plane.event_metadata[i].name = name
    for i, name in enumerate(["kernel_type", "PartitionedCall"], start=1):
        plane.stat_metadata[i].id = i
        plane.stat_metadata[i].name = name

    def add(line, meta: int, start_ms: float, ms: float):
        event = line.events.add(metadata_id=meta, offset_ps=int(start_ms * MS))
        event.duration_ps = int(ms * MS)
        return event

    compute = plane.lines.add(name="tf_Compute/1")
    add(compute, 1, 0, 60)  # the executor's own event around everything: not an op
    add(compute, 2, 0, 10)  # forward convolution, 10 ms
    add(compute, 3, 10, 8)  # kernel gradient, 8 ms
    add(compute, 4, 20, 20)  # a function call of 20 ms ...
    add(compute, 5, 22, 8)  # ... that ran a ReLU of 8 ms inside it
    xla = add(compute, 6, 45, 5)  # an XLA function: an asynchronous call
    xla.stats.add(metadata_id=1, ref_value=2)
    add(compute, 7, 52, 2)  # optimizer arithmetic
    other = plane.lines.add(name="python")
    add(other, 2, 0, 99)  # ops outside the executor's threads are not counted
    return space


def test_self_time_takes_nested_ops_out_of_their_caller():
    (ops,) = ob.op_events(_space())
    assert sorted(ops)[0] == ("Mul", 52 * MS, 2 * MS)
    times = dict(ob.self_times(ops))
    assert times["StatefulPartitionedCall"] == 12 * MS  # 20 less the ReLU's 8
    assert times["Relu"] == 8 * MS
    assert times["PartitionedCall"] == 5 * MS  # the asynchronous call, typed by its stat


def test_summary_splits_the_step_into_its_parts():
    # Two steps of 50 ms each, traced as one.
    s = ob.summarize(ob.op_events(_space()), step_s=0.05, steps=2)
    parts = s["categories"]
    assert parts["convolution forward"] == pytest.approx(5.0)
    assert parts["convolution kernel gradients"] == pytest.approx(4.0)
    assert parts["XLA-compiled functions (element-wise, side-by-side rows)"] == pytest.approx(
        (12 + 5) / 2
    )
    assert parts[ob.OTHER] == pytest.approx((8 + 2) / 2)  # the ReLU and the multiply
    assert s["unaccounted_ms"] == pytest.approx(50 - (10 + 8 + 17 + 10) / 2)
    top = s["rows"][0]
    assert top["op"] == "StatefulPartitionedCall" and top["calls_per_step"] == 0.5


def test_op_types_lose_the_onednn_prefix_for_their_part():
    assert ob.base_type("_MklNativeFusedBatchNormGradV3") == "FusedBatchNormGradV3"
    assert ob.category("_MklNativeFusedBatchNormEx") == "batch norm forward"
    assert ob.category("_MklMatMul") == "matmuls"
    assert ob.category("ReluGrad") == ob.OTHER
