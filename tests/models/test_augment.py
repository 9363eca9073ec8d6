"""Statistical and numerical checks of the SimCLR augmentations.

Rates are measured over N independent draws run through `tf.data` map (as in the input pipeline);
bands are 5 binomial standard deviations wide so the tests are not flaky.
"""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from models import augment

N = 2000


def _binomial_band(p: float, n: int = N) -> float:
    return 5.0 * np.sqrt(p * (1.0 - p) / n)


def _map_copies(fn, image, n: int = N, parallel: bool = True) -> np.ndarray:
    """Runs `fn` on n copies of `image` through tf.data and returns the stacked outputs."""
    calls = tf.data.AUTOTUNE if parallel else None
    ds = tf.data.Dataset.from_tensors(image).repeat(n).map(fn, num_parallel_calls=calls)
    return next(iter(ds.batch(n))).numpy()


def _uint8_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _colourful_image(size: int = 8, seed: int = 0) -> np.ndarray:
    """Float image away from 0 and 1 so colour changes are not hidden by clipping."""
    return np.random.default_rng(seed).uniform(0.15, 0.85, (size, size, 3)).astype(np.float32)


def _changed(outputs: np.ndarray, image: np.ndarray) -> np.ndarray:
    return np.any(outputs != image[np.newaxis], axis=(1, 2, 3))


def _is_gray(outputs: np.ndarray) -> np.ndarray:
    equal = (outputs[..., 0] == outputs[..., 1]) & (outputs[..., 1] == outputs[..., 2])
    return np.all(equal, axis=(1, 2))


@pytest.fixture(autouse=True)
def _seed():
    tf.random.set_seed(1234)


# --- shapes, dtypes, values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_hw,size", [((32, 32), 32), ((64, 64), 64), ((48, 40), 32), ((72, 96), 64)]
)
def test_train_output_static_shape_and_dtype(input_hw, size):
    """The batching code relies on the static shape, whatever the stored image size."""
    image = _uint8_image(*input_hw)

    def fn(x):
        return augment.preprocess_for_train(x, size, color_distort=True, use_blur=True)

    ds = tf.data.Dataset.from_tensors(image).repeat(8).map(fn, tf.data.AUTOTUNE)
    assert ds.element_spec.shape == (size, size, 3)
    assert ds.element_spec.dtype == tf.float32


def test_train_without_random_ops_is_the_rescaled_input():
    """uint8 is scaled by 1/255 (not clipped or rescaled twice); a same-size float image, taken
    as already in [0, 1], passes through bit-exactly, also with no static shape."""
    image = _uint8_image(16, 16)
    out = augment.preprocess_for_train(
        tf.constant(image), 16, color_distort=False, crop=False, flip=False
    )
    np.testing.assert_allclose(out.numpy(), image / 255.0, rtol=0, atol=1e-7)

    fn = tf.function(
        lambda x: augment.preprocess_for_train(x, 16, color_distort=False, crop=False, flip=False),
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
    )
    floats = _colourful_image(16)
    np.testing.assert_array_equal(fn(tf.constant(floats)).numpy(), floats)


def test_train_accepts_unknown_static_shape():
    fn = tf.function(
        lambda x: augment.preprocess_for_train(
            x, 32, color_distort=True, color_jitter_impl="v1", use_blur=True
        ),
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
    )
    assert fn.get_concrete_function().structured_outputs.shape == (32, 32, 3)
    assert fn(tf.constant(_uint8_image(40, 36), tf.float32) / 255.0).shape == (32, 32, 3)


@pytest.mark.parametrize("input_hw,size", [((40, 36), 32), ((80, 96), 64), ((64, 64), 64)])
def test_eval_is_numpy_centre_crop_then_bicubic_resize(input_hw, size):
    """Crop geometry computed here independently: side rint(0.875 * shorter side), odd margin
    before the crop, and no crop at 32 px or below."""
    image = _uint8_image(*input_hw)
    height, width = input_hw
    if size > 32:
        side = int(np.rint(0.875 * min(height, width)))
        top, left = (height - side + 1) // 2, (width - side + 1) // 2
        window = image[top : top + side, left : left + side]
    else:
        window = image
    expected = tf.image.resize(window / 255.0, [size, size], method="bicubic").numpy()
    out = augment.preprocess_for_eval(tf.constant(image), size)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), np.clip(expected, 0.0, 1.0), atol=1e-5)


def test_eval_at_cifar_size_is_plain_conversion():
    image = _uint8_image(32, 32)
    out = augment.preprocess_for_eval(tf.constant(image), 32).numpy()
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)


def test_eval_center_crop_geometry():
    # side = rint(0.875 * 72) = 63, offsets ((72-63+1)//2, (96-63+1)//2) = (5, 17); a 63 target
    # makes the resize an identity, so the output is exactly the centre window.
    image = _uint8_image(72, 96)
    out = augment.preprocess_for_eval(tf.constant(image), 63).numpy()
    np.testing.assert_allclose(out, image[5:68, 17:80] / 255.0, atol=1e-5)


def test_eval_without_center_crop_keeps_whole_image():
    image = _uint8_image(64, 64)
    out = augment.preprocess_for_eval(tf.constant(image), 64, center_crop=False).numpy()
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)


# --- random resized crop ---------------------------------------------------------------------


def _simulate_crop_areas(height: int, width: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Relative areas of the crop sampling rule: per attempt, aspect ~ U[3/4, 4/3], integer height
    uniform between the heights giving 8% and 100% area (capped to fit), width = round(h * aspect),
    one-pixel fix-ups for rounding; accept if area >= 10% of the image (min_object_covered),
    otherwise retry, up to 100 attempts, then the whole image."""
    total = height * width
    min_area, max_area = 0.08 * total, 1.0 * total
    areas = np.ones(n)
    for i in range(n):
        for _ in range(100):
            aspect = rng.uniform(0.75, 4.0 / 3.0)
            low = int(np.rint(np.sqrt(min_area / aspect)))
            high = int(np.rint(np.sqrt(max_area / aspect)))
            if np.rint(high * aspect) > width:
                high = int((width + 0.5 - 1e-7) / aspect)
                if np.rint(high * aspect) > width:
                    high -= 1
            high = min(high, height)
            h = int(rng.integers(min(low, high), high + 1))
            w = int(np.rint(h * aspect))
            if w * h < min_area:
                h += 1
                w = int(np.rint(h * aspect))
            if w * h > max_area:
                h -= 1
                w = int(np.rint(h * aspect))
            area = w * h
            if min_area <= area <= max_area and 0 < w <= width and 0 < h <= height:
                if area >= 0.1 * total:
                    areas[i] = area / total
                    break
    return areas


@pytest.mark.parametrize("height,width", [(32, 32), (48, 40)])
def test_crop_box_area_and_aspect(height, width):
    image = np.zeros((height, width, 3), np.uint8)

    def box(x):
        offset, size = augment.sample_crop_box(tf.shape(x))
        return tf.concat([offset, size], 0)

    boxes = _map_copies(box, image)
    y, x, h, w = boxes.T
    assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
    areas = h * w / (height * width)
    assert areas.min() >= 0.08 and areas.max() <= 1.0
    # Width is the rounded product height * aspect, so the ratio may exceed the range by 0.5 / h.
    ratio = w / h
    assert np.all(ratio >= 0.75 - 0.5 / h - 1e-6) and np.all(ratio <= 4.0 / 3.0 + 0.5 / h + 1e-6)

    n_sim = 20000
    simulated = _simulate_crop_areas(height, width, n_sim, np.random.default_rng(0))
    band = 5.0 * simulated.std() * np.sqrt(1.0 / N + 1.0 / n_sim)
    assert abs(areas.mean() - simulated.mean()) < band
    # The rule is far from uniform-in-area (mean 0.54): it is uniform in side length.
    assert simulated.mean() < 0.47


def test_random_resized_crop_of_constant_image_is_constant():
    image = tf.fill([48, 40, 3], 0.25)
    out = _map_copies(lambda x: augment.random_resized_crop(x, 24), image, n=50)
    assert out.shape == (50, 24, 24, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-5)


# --- flip, colour, grayscale -----------------------------------------------------------------


def test_flip_rate():
    image = _uint8_image(16, 16)
    outputs = _map_copies(
        lambda x: augment.preprocess_for_train(x, 16, color_distort=False, crop=False), image
    )
    same = np.all(np.abs(outputs - image / 255.0) < 1e-6, axis=(1, 2, 3))
    flipped = np.all(np.abs(outputs - image[:, ::-1] / 255.0) < 1e-6, axis=(1, 2, 3))
    assert np.all(same ^ flipped)
    assert abs(flipped.mean() - 0.5) < _binomial_band(0.5)


@pytest.mark.parametrize("impl", ["v1", "v2"])
def test_jitter_rate(impl):
    image = _colourful_image()
    outputs = _map_copies(
        lambda x: augment.random_color_distort(x, impl=impl, grayscale_prob=0.0), image
    )
    changed = _changed(outputs, image)
    assert abs(changed.mean() - 0.8) < _binomial_band(0.8)


def test_train_jitter_and_grayscale_are_independent_draws():
    """The four outcomes of jitter (p=0.8) x grayscale (p=0.2) have the product rates.

    Grayscale of the untouched image is told apart from grayscale of a jittered one by its
    luma. One shared draw for both decisions would make 'grayscale only' impossible: 0 instead
    of 0.04, nine standard deviations away.
    """
    image = _colourful_image()
    outputs = _map_copies(
        lambda x: augment.preprocess_for_train(x, 8, color_distort=True, crop=False, flip=False),
        image,
    )
    luma = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    plain_gray = np.all(np.abs(outputs - luma[None, ..., None]) < 1e-4, axis=(1, 2, 3))
    gray = _is_gray(outputs)
    changed = _changed(outputs, image)
    rates = {
        "untouched": (~changed).mean(),
        "jitter only": (changed & ~gray).mean(),
        "grayscale only": plain_gray.mean(),
        "both": (gray & ~plain_gray).mean(),
    }
    expected = {"untouched": 0.16, "jitter only": 0.64, "grayscale only": 0.04, "both": 0.16}
    for name, p in expected.items():
        assert abs(rates[name] - p) < _binomial_band(p), (name, rates[name])


def test_to_grayscale_matches_luma():
    image = _colourful_image(seed=3)
    out = augment.to_grayscale(tf.constant(image)).numpy()
    luma = image @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(out, np.repeat(luma[..., None], 3, axis=-1), atol=1e-3)


def test_brightness_v2_multiplicative_v1_additive():
    image = _colourful_image(seed=1)
    for _ in range(5):
        v2 = augment.random_brightness(tf.constant(image), 0.8, impl="v2").numpy()
        ratio = v2 / image
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
        assert 0.2 - 1e-6 <= ratio.flat[0] <= 1.8 + 1e-6
        v1 = augment.random_brightness(tf.constant(image), 0.8, impl="v1").numpy()
        delta = v1 - image
        np.testing.assert_allclose(delta, delta.flat[0], atol=1e-6)
        assert -0.8 - 1e-6 <= delta.flat[0] <= 0.8 + 1e-6


@pytest.mark.parametrize("impl", ["v1", "v2"])
def test_zero_strength_jitter_is_identity(impl):
    image = _colourful_image(seed=2)
    out = augment.color_jitter(tf.constant(image), 0.0, impl=impl).numpy()
    np.testing.assert_array_equal(out, image)


# Colour-jitter probes: three 4x4 images, each exposing one jitter component while the others
# either leave it untouched or act on it in a way the measurement divides out. Levels are chosen
# so that no pixel is ever clipped (checked), which keeps every measurement exact:
# - gray constant: contrast (no deviation from the mean), saturation and hue (no chroma) do
#   nothing, so the output is the brightness change alone;
# - gray checkerboard: saturation and hue do nothing; brightness scales (v2: the coefficient of
#   variation is unchanged) or shifts (v1: the standard deviation is unchanged) it, so those give
#   the contrast factor;
# - one constant colour: contrast does nothing; hue keeps HSV saturation S and chroma max - min,
#   v2 brightness keeps S and v1 brightness keeps the chroma, so S (v2) or the chroma (v1) gives
#   the saturation factor; the hue shift is untouched by everything else.


def _jitter_probes(level: float, spread: float, saturation: float) -> np.ndarray:
    gray = np.full((4, 4, 3), level, np.float32)
    sign = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 1.0, -1.0)[..., None]
    checker = (gray + spread * sign).astype(np.float32)
    colour = np.array([level, level * (1 - 0.3 * saturation), level * (1 - saturation)])
    return np.stack([gray, checker, np.broadcast_to(colour, (4, 4, 3))]).astype(np.float32)


def _hue(rgb: np.ndarray) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*map(float, pixel))[0] for pixel in rgb])


def _measure_jitter(outputs: np.ndarray, probes: np.ndarray, impl: str) -> dict[str, np.ndarray]:
    gray, checker, colour = outputs[:, 0, 0, 0, 0], outputs[:, 1, ..., 0], outputs[:, 2, 0, 0]
    gray0, checker0, colour0 = probes[0, 0, 0, 0], probes[1, ..., 0], probes[2, 0, 0]
    chroma = colour.max(-1) - colour.min(-1)
    chroma0 = colour0.max() - colour0.min()
    if impl == "v2":
        brightness = gray / gray0
        contrast = (checker.std((1, 2)) / checker.mean((1, 2))) / (checker0.std() / checker0.mean())
        saturation = (chroma / colour.max(-1)) / (chroma0 / colour0.max())
    else:
        brightness = gray - gray0
        contrast = checker.std((1, 2)) / checker0.std()
        saturation = chroma / chroma0
    hue = (_hue(colour) - _hue(colour0[None])[0] + 0.5) % 1.0 - 0.5
    return {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}


def _assert_uniform_on(values: np.ndarray, low: float, high: float, name: str) -> None:
    """Bounds, both ends reached (all draws miss the last 2% of the range with p = 0.98^2000,
    about 3e-18), the mean within 5 standard errors and no repeated draw. A magnitude off by 2x
    breaks a bound or leaves an end unreached; a shifted or unclamped range moves the mean."""
    width = high - low
    assert values.min() >= low - 1e-3 * width and values.max() <= high + 1e-3 * width, name
    assert values.min() < low + 0.02 * width and values.max() > high - 0.02 * width, name
    standard_error = width / np.sqrt(12 * values.size)
    assert abs(values.mean() - (low + high) / 2) < 5 * standard_error, name
    assert len(np.unique(values)) > 0.99 * values.size, f"{name}: repeated draws"


@pytest.mark.parametrize(
    "impl,strength,probe",
    [
        ("v2", 0.5, (0.3, 0.02, 0.3)),
        ("v2", 1.0, (0.3, 0.02, 0.3)),
        ("v2", 2.0, (0.3, 0.02, 0.3)),  # lower factor bounds clamp at 0
        ("v1", 0.5, (0.5, 0.05, 0.1)),
    ],
)
def test_jitter_component_magnitudes(impl, strength, probe):
    """Brightness, contrast and saturation factors uniform on [max(1 - 0.8s, 0), 1 + 0.8s]
    (v1 brightness: offsets on [-0.8s, 0.8s]) and hue shifts uniform on [-0.2s, 0.2s], measured
    through the full random-order jitter on the probes above."""
    probes = _jitter_probes(*probe)
    outputs = _map_copies(lambda x: augment.color_jitter(x, strength, impl=impl), probes)
    assert 0.0 < outputs.min() and outputs.max() < 1.0  # nothing clipped: measurements are exact
    assert np.all(outputs[:, :2] == outputs[:, :2, ..., :1])  # the gray probes stay gray
    measured = _measure_jitter(outputs, probes, impl)

    factor_range = (max(1.0 - 0.8 * strength, 0.0), 1.0 + 0.8 * strength)
    brightness_range = factor_range if impl == "v2" else (-0.8 * strength, 0.8 * strength)
    _assert_uniform_on(measured["brightness"], *brightness_range, "brightness")
    _assert_uniform_on(measured["contrast"], *factor_range, "contrast")
    _assert_uniform_on(measured["saturation"], *factor_range, "saturation")
    if factor_range[0] > 0.1:  # the hue of a nearly desaturated colour is not measurable
        _assert_uniform_on(measured["hue"], -0.2 * strength, 0.2 * strength, "hue")


def _brightness_contrast_signatures(low, mid, high, tol: float = 1e-4):
    """Outputs of the gray levels (0, 0.5, 1) only one relative order of v2 brightness (B, scale
    then clip) and contrast (C, stretch about the mean then clip) can produce.

    Unclipped, B and C commute; clipping breaks the symmetry. C then B keeps mid - low equal to
    high - mid unless the top level is clipped to 1. B then C is symmetric only when neither
    clips (factor and stretch <= 1), which leaves the middle at most 0.5 and the low level above
    0. Hence 'asymmetric, top below 1' is B-first only, and 'symmetric, top below 1, low at 0 or
    middle above 0.5' is C-first only.
    """
    symmetric = np.abs((high - mid) - (mid - low)) < tol
    top_free = high < 1.0 - tol
    b_first = ~symmetric & top_free
    c_first = symmetric & top_free & ((low < tol) | (mid > 0.5 + tol))
    return b_first, c_first


def test_jitter_order_is_random_per_image():
    """Both relative orders of brightness and contrast occur, at the rates a uniformly random
    order gives. The rates come from a numpy simulation of the two clipped transforms (the gray
    image makes saturation and hue no-ops); a fixed order would make one of them 0."""
    levels = np.array([0.0, 0.5, 1.0], np.float32)
    image = np.broadcast_to(levels[:, None, None], (3, 3, 3)).copy()
    outputs = _map_copies(lambda x: augment.color_jitter(x, 0.5), image)
    assert np.all(outputs == outputs[..., :1])
    observed = _brightness_contrast_signatures(*outputs[:, :, 0, 0].T)

    rng = np.random.default_rng(0)
    n = 200_000
    scale = rng.uniform(0.6, 1.4, (n, 1))
    stretch = rng.uniform(0.6, 1.4, (n, 1))
    x = np.broadcast_to(levels.astype(np.float64), (n, 3))

    def brightness(v):
        return np.clip(v * scale, 0.0, 1.0)

    def contrast(v):
        mean = v.mean(axis=1, keepdims=True)
        return np.clip(mean + stretch * (v - mean), 0.0, 1.0)

    b_first = rng.random((n, 1)) < 0.5
    simulated = np.where(b_first, contrast(brightness(x)), brightness(contrast(x)))
    expected = _brightness_contrast_signatures(*simulated.T)
    for name, got, want in zip(["B first", "C first"], observed, expected, strict=True):
        p = want.mean()
        assert p > 0.15  # each signature is common, so a missing order is unmistakable
        assert abs(got.mean() - p) < _binomial_band(p), (name, got.mean(), p)


def test_random_parameters_are_fresh_per_image_and_per_view_under_a_global_seed():
    """Training sets a global seed. Jitter magnitudes, order and blur sigma must still differ
    between images and between the two views made in one map call (random ops created inside
    cond/switch branches would share op seeds there and replay one sequence)."""
    tf.random.set_seed(0)
    image = np.full((4, 4, 3), 0.3, np.float32)
    colourful = _colourful_image()

    def two_views(x):
        def jitter():
            return augment.random_color_distort(x, strength=0.5, grayscale_prob=0.0)

        def blur():
            return augment.random_blur(tf.constant(colourful), 5, p=1.0, sigma_range=(1.0, 2.0))

        return jitter(), jitter(), blur(), blur()

    ds = tf.data.Dataset.from_tensors(image).repeat(N).map(two_views)
    view1, view2, blur1, blur2 = (t.numpy() for t in next(iter(ds.batch(N))))
    # A jittered gray constant is 0.3 times the brightness factor: one fresh draw per image.
    view1, view2 = view1[:, 0, 0, 0], view2[:, 0, 0, 0]
    jittered1, jittered2 = view1 != np.float32(0.3), view2 != np.float32(0.3)
    assert len(np.unique(view1[jittered1])) >= jittered1.sum() - 2
    assert len(np.unique(view2[jittered2])) >= jittered2.sum() - 2
    assert np.sum((view1 == view2) & jittered1 & jittered2) <= 2
    assert np.sum(np.all(blur1 == blur2, axis=(1, 2, 3))) <= 2


def test_unknown_jitter_impl_raises():
    with pytest.raises(ValueError, match="color_jitter_impl"):
        augment.preprocess_for_train(
            tf.zeros([8, 8, 3]), 8, color_distort=True, color_jitter_impl="simclrv3"
        )


# --- blur ------------------------------------------------------------------------------------


def _numpy_gaussian_blur(image: np.ndarray, radius: int, sigma: float) -> np.ndarray:
    """Direct 2-D convolution with the normalised outer-product Gaussian, zero padding."""
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(taps**2) / (2 * sigma**2))
    g /= g.sum()
    kernel = np.outer(g, g)
    h, w, _ = image.shape
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
    out = np.zeros(image.shape, np.float64)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


@pytest.mark.parametrize("kernel_size,radius", [(5, 2), (4, 2), (3, 1)])
def test_gaussian_blur_matches_numpy(kernel_size, radius):
    image = np.random.default_rng(5).uniform(0, 1, (9, 11, 3)).astype(np.float32)
    out = augment.gaussian_blur(tf.constant(image), kernel_size, tf.constant(1.3)).numpy()
    np.testing.assert_allclose(out, _numpy_gaussian_blur(image, radius, 1.3), atol=1e-5)
    batched = augment.gaussian_blur(tf.constant(image[None]), kernel_size, 1.3).numpy()
    np.testing.assert_allclose(batched[0], out, atol=1e-6)


def test_gaussian_blur_tiny_kernel_is_identity():
    image = _colourful_image()
    for kernel_size in (0, 1):
        out = augment.gaussian_blur(tf.constant(image), kernel_size, 1.0).numpy()
        np.testing.assert_array_equal(out, image)


def test_blur_sigma_is_drawn_per_image():
    sigmas = _map_copies(lambda x: augment.sample_blur_sigma(), tf.zeros([]))
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert len(np.unique(sigmas)) > 0.99 * N
    # U[0.1, 2.0]: mean 1.05, std 1.9 / sqrt(12).
    assert abs(sigmas.mean() - 1.05) < 5 * (1.9 / np.sqrt(12)) / np.sqrt(N)
    # Always-on blur of identical images: distinct outputs show a separate sigma per image.
    outputs = _map_copies(lambda x: augment.random_blur(x, 5, p=1.0), _colourful_image(), n=200)
    assert len(np.unique(outputs[:, 4, 4, 0])) > 190


def test_blur_rate():
    image = _colourful_image()
    outputs = _map_copies(lambda x: augment.random_blur(x, 3, sigma_range=(1.0, 2.0)), image)
    assert abs(_changed(outputs, image).mean() - 0.5) < _binomial_band(0.5)


def test_train_blur_rate():
    # Blur fires with p = 0.5, but with sigma near its 0.1 floor the 3-tap kernel's side weights
    # (exp(-1 / (2 sigma^2))) fall below float32 resolution; sigma < 0.29 (10% of draws) is
    # allowed to look unblurred, so the visible rate lies in [0.45, 0.5].
    image = _colourful_image(size=32)
    outputs = _map_copies(
        lambda x: augment.preprocess_for_train(
            x, 32, color_distort=False, use_blur=True, crop=False, flip=False
        ),
        image,
    )
    rate = _changed(outputs, image).mean()
    assert 0.45 - _binomial_band(0.45) < rate < 0.5 + _binomial_band(0.5)


def test_train_is_reproducible_with_global_seed():
    image = tf.constant(_uint8_image(40, 40))

    def run():
        tf.random.set_seed(7)
        return _map_copies(
            lambda x: augment.preprocess_for_train(x, 32, color_distort=True, use_blur=True),
            image,
            n=8,
            parallel=False,
        )

    np.testing.assert_array_equal(run(), run())
