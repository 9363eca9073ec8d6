"""Statistical and numerical checks of the SimCLR augmentations.

Rates are measured over N independent draws run through `tf.data` map (as in the input pipeline);
bands are 5 binomial standard deviations wide so the tests are not flaky.
"""

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


# --- shapes, dtypes, ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_hw,size", [((32, 32), 32), ((64, 64), 64), ((48, 40), 32), ((72, 96), 64)]
)
def test_train_output_shape_dtype_range(input_hw, size):
    image = _uint8_image(*input_hw)

    def fn(x):
        return augment.preprocess_for_train(x, size, color_distort=True, use_blur=True)

    ds = tf.data.Dataset.from_tensors(image).repeat(64).map(fn, tf.data.AUTOTUNE)
    assert ds.element_spec.shape == (size, size, 3)
    out = next(iter(ds.batch(64))).numpy()
    assert out.dtype == np.float32
    assert out.shape == (64, size, size, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_train_accepts_unknown_static_shape_and_float_input():
    fn = tf.function(
        lambda x: augment.preprocess_for_train(
            x, 32, color_distort=True, color_jitter_impl="v1", use_blur=True
        ),
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
    )
    out = fn(tf.constant(_uint8_image(40, 36), tf.float32) / 255.0).numpy()
    assert out.shape == (32, 32, 3) and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("input_hw,size", [((40, 36), 32), ((80, 96), 64), ((64, 64), 64)])
def test_eval_output_shape_dtype_range(input_hw, size):
    out = augment.preprocess_for_eval(tf.constant(_uint8_image(*input_hw)), size)
    assert out.dtype == tf.float32
    assert out.shape == (size, size, 3)
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0


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
    assert outputs.min() >= 0.0 and outputs.max() <= 1.0


def test_train_color_distort_grayscale_and_untouched_rates():
    image = _colourful_image()
    outputs = _map_copies(
        lambda x: augment.preprocess_for_train(x, 8, color_distort=True, crop=False, flip=False),
        image,
    )
    gray = _is_gray(outputs)
    assert abs(gray.mean() - 0.2) < _binomial_band(0.2)
    # Untouched only when neither jitter (0.8) nor grayscale (0.2) fired: 0.2 * 0.8 = 0.16.
    untouched = ~_changed(outputs, image)
    assert abs(untouched.mean() - 0.16) < _binomial_band(0.16)


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


@pytest.mark.parametrize("impl", ["v1", "v2"])
def test_strong_jitter_runs(impl):
    image = _colourful_image(seed=4)
    out = augment.color_jitter(tf.constant(image), 2.0, impl=impl).numpy()
    assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0


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
