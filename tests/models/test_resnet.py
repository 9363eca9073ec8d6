"""Tests for the ResNet backbone: shapes, parameter counts, initialization, freezing, numerics."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import cpu_elementwise, side_by_side
from models.resnet import (
    BATCH_NORM_EPSILON,
    ENDPOINTS,
    BasicBlock,
    BatchNormRelu,
    BottleneckBlock,
    FixedPaddingConv2D,
    ProjectionShortcut,
    ResNet,
    SelectiveKernelConv2D,
    SqueezeExcitation,
)


def _images(batch: int, size: int, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).uniform(size=(batch, size, size, 3)), tf.float32)


def _trainable_param_count(**kwargs) -> int:
    """Counts trainable parameters without allocating them.

    In a v1 graph variables are only declared, so even 800M-parameter models cost no memory.
    Autograph conversion is skipped because it dominates graph construction time.
    """
    with tf.Graph().as_default():
        model = ResNet(**kwargs)
        build = tf.autograph.experimental.do_not_convert(model)
        build(tf.compat.v1.placeholder(tf.float32, [1, 32, 32, 3]))
        return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def _norm(**kwargs) -> BatchNormRelu:
    return BatchNormRelu(0.9, False, **kwargs)


def _bn_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _np_conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct convolution on [N, H, W, C] with explicit (before, after) spatial padding."""
    x = np.pad(x, [(0, 0), pad, pad, (0, 0)])
    k = kernel.shape[0]
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            out[:, i, j, :] = np.einsum("nhwc,hwcd->nd", patch, kernel)
    return out


def _np_bn_inference(x: np.ndarray) -> np.ndarray:
    # Freshly built BN in inference mode: moving mean 0, variance 1, gamma 1, beta 0.
    return x / np.sqrt(1.0 + BATCH_NORM_EPSILON)


def _randomize_bn(bn: keras.layers.BatchNormalization, seed: int) -> None:
    """Random statistics and affine terms, so that inference BN is far from the identity."""
    rng = np.random.default_rng(seed)
    bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
    bn.beta.assign(rng.normal(size=bn.beta.shape))
    bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, bn.moving_variance.shape))


def _np_bn_relu(x: np.ndarray, bn: keras.layers.BatchNormalization) -> np.ndarray:
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + BATCH_NORM_EPSILON)
    return np.maximum((x - bn.moving_mean.numpy()) * scale + bn.beta.numpy(), 0.0)


def _np_max_pool_3x3_stride2_same(x: np.ndarray) -> np.ndarray:
    """'SAME' max pooling: output ceil(n / 2), padding split with the extra pixel after."""
    n = x.shape[1]
    out = -(-n // 2)
    total = max((out - 1) * 2 + 3 - n, 0)
    before = total // 2
    padded = np.pad(
        x,
        [(0, 0), (before, total - before), (before, total - before), (0, 0)],
        constant_values=-np.inf,
    )
    windows = [
        padded[:, dy : dy + 2 * out : 2, dx : dx + 2 * out : 2]
        for dy in range(3)
        for dx in range(3)
    ]
    return np.max(windows, axis=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 42}, "resnet_depth"),
        ({"depth": 18, "width_multiplier": 0}, "width_multiplier"),
        ({"depth": 18, "width_multiplier": 1.5}, "width_multiplier"),
        ({"depth": 18, "fine_tune_after_block": 5}, "fine_tune_after_block"),
        ({"depth": 18, "fine_tune_after_block": -2}, "fine_tune_after_block"),
        ({"depth": 18, "sk_ratio": -0.1}, "sk_ratio"),
        ({"depth": 18, "se_ratio": -0.1}, "se_ratio"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNet(**kwargs)


def test_fractional_width_makes_a_thinner_network():
    model = ResNet(depth=18, width_multiplier=0.25, cifar_stem=True)
    endpoints = model(_images(2, 32), training=False)
    assert endpoints["initial_conv"].shape == (2, 32, 32, 16)
    assert endpoints["final_avg_pool"].shape == (2, 128)
    assert model.output_dim == 128


def test_resnet18_cifar_stem_endpoint_shapes():
    model = ResNet(depth=18, cifar_stem=True)
    endpoints = model(_images(2, 32), training=False)
    expected = {
        "initial_conv": (2, 32, 32, 64),
        "initial_max_pool": (2, 32, 32, 64),
        "block_group1": (2, 32, 32, 64),
        "block_group2": (2, 16, 16, 128),
        "block_group3": (2, 8, 8, 256),
        "block_group4": (2, 4, 4, 512),
        "final_avg_pool": (2, 512),
    }
    assert {k: tuple(v.shape) for k, v in endpoints.items()} == expected
    assert set(ENDPOINTS) == set(expected)
    assert model.output_dim == 512
    # The CIFAR stem has no pooling: its output is BN-ReLU of the conv (BN randomized so that
    # skipping it, or using batch statistics, would show).
    bn = model.stem.norms[0].batch_normalization
    _randomize_bn(bn, seed=1)
    endpoints = model(_images(2, 32), training=False)
    np.testing.assert_allclose(
        endpoints["initial_max_pool"].numpy(),
        _np_bn_relu(endpoints["initial_conv"].numpy(), bn),
        rtol=1e-5,
        atol=1e-5,
    )


def test_resnet50_imagenet_stem_endpoint_shapes_and_pooling():
    model = ResNet(depth=50)
    endpoints = model(_images(2, 64), training=False)
    expected = {
        "initial_conv": (2, 32, 32, 64),
        "initial_max_pool": (2, 16, 16, 64),
        "block_group1": (2, 16, 16, 256),
        "block_group2": (2, 8, 8, 512),
        "block_group3": (2, 4, 4, 1024),
        "block_group4": (2, 2, 2, 2048),
        "final_avg_pool": (2, 2048),
    }
    assert {k: tuple(v.shape) for k, v in endpoints.items()} == expected
    assert model.output_dim == 2048
    bn = model.stem.norms[0].batch_normalization
    _randomize_bn(bn, seed=2)
    endpoints = model(_images(2, 64), training=False)
    np.testing.assert_allclose(
        endpoints["initial_max_pool"].numpy(),
        _np_max_pool_3x3_stride2_same(_np_bn_relu(endpoints["initial_conv"].numpy(), bn)),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        endpoints["final_avg_pool"].numpy(),
        endpoints["block_group4"].numpy().mean(axis=(1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "expected", "rel_tol"),
    [
        # torchvision/Keras ResNet-50 has 25,557,032 parameters including its 2048x1000 fc
        # (2,049,000); SimCLR's ResNet-50 is the same v1.5 network, so the backbone is exact.
        ({"depth": 50, "width_multiplier": 1}, 23_508_032, 0.0),
        # Published backbone sizes (no projection or supervised head), rounded to 1M in the
        # SimCLR paper (2x, 4x) and the SimCLRv2 README table (1x SK, 152 3x SK). The README's
        # "24M" for ResNet-50 1x is the 23.5M above rounded.
        ({"depth": 50, "width_multiplier": 2}, 94e6, 0.01),
        ({"depth": 50, "width_multiplier": 4}, 375e6, 0.01),
        ({"depth": 50, "width_multiplier": 1, "sk_ratio": 0.0625}, 35e6, 0.01),
        ({"depth": 152, "width_multiplier": 3, "sk_ratio": 0.0625}, 795e6, 0.01),
    ],
)
def test_trainable_parameter_counts_match_published_sizes(kwargs, expected, rel_tol):
    count = _trainable_param_count(**kwargs)
    assert abs(count - expected) <= rel_tol * expected, count


def test_batch_norm_settings_and_variable_names():
    model = ResNet(depth=18, cifar_stem=True, batch_norm_decay=0.97)
    model(_images(1, 8))
    bns = _bn_layers(model)
    # Stem 1 + 8 blocks x 2 + 4 projection shortcuts.
    assert len(bns) == 1 + 8 * 2 + 4
    for bn in bns:
        assert bn.epsilon == BATCH_NORM_EPSILON
        assert bn.momentum == 0.97
        assert not bn.synchronized
    for variable in model.variables:
        # Convolutions carry no bias; everything else belongs to a BN layer the optimizer can
        # recognize by name.
        assert variable.name.endswith("kernel:0") or "batch_normalization" in variable.name, (
            variable.name
        )


def test_global_bn_uses_synchronized_batch_norm():
    model = ResNet(depth=18, cifar_stem=True, global_bn=True)
    model(_images(1, 8))
    assert all(bn.synchronized for bn in _bn_layers(model))


def test_fused_and_unfused_batch_norm_compute_the_same_step():
    """The step benchmark's BN lever changes the kernel, not the maths: same outputs, gradients
    and moving means from the same weights. (The fused kernel's moving variance takes the
    unbiased batch variance, n/(n-1) times the unfused one; inference-time only.)"""
    images = _images(4, 8)
    results = []
    for fused in (True, False):
        keras.utils.set_random_seed(3)
        model = ResNet(depth=18, width_multiplier=0.125, cifar_stem=True, fused_batch_norm=fused)
        with tf.GradientTape() as tape:
            pooled = model(images, training=True)["final_avg_pool"]
            loss = tf.reduce_sum(pooled**2)
        grads = tape.gradient(loss, model.trainable_variables)
        moving = [v for v in model.variables if "moving_mean" in v.name]
        assert all(bn.fused == fused for bn in _bn_layers(model))
        results.append((pooled.numpy(), [g.numpy() for g in grads], [m.numpy() for m in moving]))
    (pooled_f, grads_f, moving_f), (pooled_u, grads_u, moving_u) = results
    np.testing.assert_allclose(pooled_f, pooled_u, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_f + moving_f, grads_u + moving_u, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_conv_kernels_use_fan_in_variance_scaling():
    model = ResNet(depth=50)
    model(_images(1, 32))
    kernel = model.block_groups[3].blocks[0].conv2.conv.kernel.numpy()  # 3x3x512x512
    fan_in = np.prod(kernel.shape[:3])
    # Truncated normal at 2 stddev keeps ~0.774 of the untruncated variance after rescaling.
    assert kernel.std() == pytest.approx(np.sqrt(1.0 / fan_in), rel=0.02)


@pytest.mark.parametrize("depth", [18, 50])
def test_last_batch_norm_of_each_block_starts_at_zero_gamma(depth):
    model = ResNet(depth=depth, cifar_stem=True)
    model(_images(1, 8))
    for group in model.block_groups:
        for block in group.blocks:
            last = block.norm2 if depth == 18 else block.norm3
            assert np.all(last.batch_normalization.gamma.numpy() == 0)
            others = [bn for bn in _bn_layers(block) if bn is not last.batch_normalization]
            assert others and all(np.all(bn.gamma.numpy() == 1) for bn in others)


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_block_without_projection_is_identity_at_init(block_cls):
    # Zero gamma silences the residual branch, so relu(x + 0) = x for non-negative inputs.
    channels = 16 * block_cls.expansion
    block = block_cls(
        16,
        1,
        use_projection=False,
        sk_ratio=0.0,
        se_ratio=0.0,
        norm=_norm,
    )
    x = np.random.default_rng(1).uniform(size=(2, 5, 5, channels)).astype(np.float32)
    np.testing.assert_allclose(block(x, training=False).numpy(), x, rtol=1e-6)


def test_fixed_padding_conv_pads_symmetrically_when_strided():
    x = np.random.default_rng(2).normal(size=(1, 6, 6, 2)).astype(np.float32)
    layer = FixedPaddingConv2D(3, kernel_size=3, strides=2)
    out = layer(x).numpy()
    kernel = layer.conv.kernel.numpy()
    # 'SAME' would pad (0, 1) here; the fixed padding pads (1, 1).
    np.testing.assert_allclose(out, _np_conv2d(x, kernel, 2, (1, 1)), rtol=1e-4, atol=1e-5)
    assert not layer.conv.use_bias


def test_resnet_d_shortcut_average_pools_before_projecting():
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 4)).astype(np.float32)
    shortcut = ProjectionShortcut(8, strides=2, resnet_d=True, norm=_norm)
    out = shortcut(x, training=False).numpy()
    kernel = shortcut.conv.conv.kernel.numpy()[0, 0]  # [4, 8]
    pooled = x.reshape(2, 3, 2, 3, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(out, _np_bn_inference(pooled @ kernel), rtol=1e-4, atol=1e-5)


def test_squeeze_excitation_matches_numpy():
    x = np.random.default_rng(4).normal(size=(2, 3, 3, 8)).astype(np.float32)
    layer = SqueezeExcitation(8, 2)
    out = layer(x).numpy()
    w1, b1 = layer.reduce.kernel.numpy()[0, 0], layer.reduce.bias.numpy()
    w2, b2 = layer.expand.kernel.numpy()[0, 0], layer.expand.bias.numpy()
    pooled = x.mean(axis=(1, 2))
    gate = 1.0 / (1.0 + np.exp(-(np.maximum(pooled @ w1 + b1, 0) @ w2 + b2)))
    np.testing.assert_allclose(out, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_selective_kernel_matches_numpy():
    x = np.random.default_rng(5).normal(size=(2, 4, 4, 3)).astype(np.float32)
    layer = SelectiveKernelConv2D(4, strides=1, sk_ratio=0.5, norm=_norm, min_dim=3)
    out = layer(x, training=False).numpy()
    assert layer.squeeze_conv.filters == 3  # max(int(4 * 0.5), 3)
    streams = np.maximum(
        _np_bn_inference(_np_conv2d(x, layer.streams_conv.conv.kernel.numpy(), 1, (1, 1))), 0
    )
    a, b = streams[..., :4], streams[..., 4:]
    descriptor = (a + b).mean(axis=(1, 2))
    squeezed = np.maximum(_np_bn_inference(descriptor @ layer.squeeze_conv.kernel.numpy()[0, 0]), 0)
    logits = squeezed @ layer.mixing_conv.kernel.numpy()[0, 0]
    la, lb = logits[:, :4], logits[:, 4:]
    wa = 1.0 / (1.0 + np.exp(lb - la))
    expected = wa[:, None, None, :] * a + (1 - wa[:, None, None, :]) * b
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_sk_and_se_variants_build_and_run():
    model = ResNet(depth=50, sk_ratio=0.0625, se_ratio=0.25)
    endpoints = model(_images(2, 32), training=True)
    assert tuple(endpoints["final_avg_pool"].shape) == (2, 2048)
    assert np.all(np.isfinite(endpoints["final_avg_pool"].numpy()))
    assert len(model.stem.convs) == 3  # ResNet-D deep stem
    first = model.block_groups[1].blocks[0]
    assert isinstance(first.conv2, SelectiveKernelConv2D)
    assert first.shortcut.avg_pool is not None
    assert first.squeeze_excitation.reduce.filters == int(128 * 0.25)
    assert first.squeeze_excitation.expand.filters == 512

    basic = ResNet(depth=18, cifar_stem=True, sk_ratio=0.0625, se_ratio=0.25)
    assert tuple(basic(_images(2, 16), training=True)["final_avg_pool"].shape) == (2, 512)


def _moving_means(layer: keras.layers.Layer) -> list[np.ndarray]:
    return [bn.moving_mean.numpy().copy() for bn in _bn_layers(layer)]


def test_fine_tune_after_block_freezes_stem_and_early_groups():
    model = ResNet(depth=18, cifar_stem=True, fine_tune_after_block=2)
    images = _images(2, 8)
    model(images, training=False)
    frozen = [model.stem, *model.block_groups[:2]]
    trained = model.block_groups[2:]
    before_frozen = [_moving_means(layer) for layer in frozen]
    before_trained = [_moving_means(layer) for layer in trained]

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(images, training=True)["final_avg_pool"])
    frozen_vars = [v for layer in frozen for v in layer.variables]
    trained_vars = [v for layer in trained for v in layer.trainable_variables]
    grads = tape.gradient(loss, frozen_vars + trained_vars)

    assert {v.ref() for v in model.trainable_variables} == {v.ref() for v in trained_vars}
    assert all(g is None for g in grads[: len(frozen_vars)])
    assert all(g is not None for g in grads[len(frozen_vars) :])
    for layer, means in zip(frozen, before_frozen, strict=True):
        for now, then in zip(_moving_means(layer), means, strict=True):
            np.testing.assert_array_equal(now, then)
    changed = [
        not np.array_equal(now, then)
        for layer, means in zip(trained, before_trained, strict=True)
        for now, then in zip(_moving_means(layer), means, strict=True)
    ]
    assert any(changed)


def test_fine_tune_after_block_4_freezes_everything_and_minus_1_nothing():
    images = _images(2, 8)
    frozen = ResNet(depth=18, cifar_stem=True, fine_tune_after_block=4)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(frozen(images, training=True)["final_avg_pool"])
    assert frozen.trainable_variables == []
    assert all(g is None for g in tape.gradient(loss, frozen.variables))

    full = ResNet(depth=18, cifar_stem=True)
    full(images)
    bn_moving = [v for v in full.variables if "moving_" in v.name]
    assert len(full.trainable_variables) == len(full.variables) - len(bn_moving)


def _bf16_backbone_step(
    depth: int, compiled: bool, training: bool, side_by_side_width: int = side_by_side.MAX_WIDTH
) -> tuple[list, int]:
    """Gradients of a tiny bfloat16 backbone's pooled output, and how many XLA-compiled
    functions its traced step calls."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(3)  # the same weights in every call
    cpu_elementwise.set_enabled(compiled)
    side_by_side.set_max_width(side_by_side_width)
    try:
        model = ResNet(depth=depth, width_multiplier=0.125, cifar_stem=True)
        images = _images(4, 8)
        model(images)
        # Zero-initialized gammas would leave every residual branch without a gradient.
        rng = np.random.default_rng(4)
        for v in model.variables:
            if "gamma" in v.name:
                v.assign(rng.uniform(0.5, 1.5, size=v.shape))

        @tf.function(autograph=False)
        def step(images):
            with tf.GradientTape() as tape:
                pooled = model(images, training=training)["final_avg_pool"]
                loss = tf.reduce_sum(tf.cast(pooled, tf.float32) ** 2)
            return tape.gradient(loss, model.trainable_variables) if training else [loss]

        library = step.get_concrete_function(images).graph.as_graph_def().library
        xla = sum(f.attr["_XlaMustCompile"].b for f in library.function)
        return [g.numpy() for g in step(images)], xla
    finally:
        cpu_elementwise.set_enabled(True)
        side_by_side.set_max_width(side_by_side.MAX_WIDTH)
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.skipif(bool(tf.config.list_logical_devices("GPU")), reason="a GPU is visible")
@pytest.mark.parametrize("depth", [18, 50])
def test_bfloat16_training_compiles_the_blocks_elementwise_work_with_the_same_gradients(depth):
    compiled, compiled_fns = _bf16_backbone_step(depth, compiled=True, training=True)
    plain, plain_fns = _bf16_backbone_step(depth, compiled=False, training=True)
    assert compiled_fns > 0 and plain_fns == 0
    # Inference keeps TensorFlow's element-wise ops (narrow maps aside, models.side_by_side).
    assert _bf16_backbone_step(depth, compiled=True, training=False, side_by_side_width=0)[1] == 0
    for got, expected in zip(compiled, plain, strict=True):
        scale = max(np.abs(expected).max(), 1e-6)
        np.testing.assert_allclose(got, expected, rtol=0.02, atol=0.02 * scale)
