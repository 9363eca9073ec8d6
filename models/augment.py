"""SimCLR image augmentations as pure TensorFlow ops.

Every function works on a single image tensor inside `tf.data.Dataset.map` or a `tf.function`:
randomness comes only from TensorFlow random ops, so each call of the mapped function draws fresh
parameters per image, and `tf.random.set_seed` makes a sequential (non-parallel) map reproducible.

The train recipe follows SimCLR: random resized crop -> horizontal flip -> colour jitter (p=0.8)
-> grayscale (p=0.2) -> optional Gaussian blur (p=0.5) -> clip to [0, 1].
"""

import functools
from collections.abc import Callable

import tensorflow as tf

# Fraction of the shorter side kept by the evaluation centre crop (standard ImageNet value).
CROP_PROPORTION = 0.875
# Below or at this size (CIFAR) evaluation skips the centre crop: the images are already tight.
EVAL_CROP_MIN_SIZE = 32

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100

JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)

COLOR_JITTER_IMPLS = ("v1", "v2")


def _check_impl(impl: str) -> None:
    if impl not in COLOR_JITTER_IMPLS:
        raise ValueError(f"color_jitter_impl must be one of {COLOR_JITTER_IMPLS}, got {impl!r}")


def to_float_image(image: tf.Tensor) -> tf.Tensor:
    """Converts to float32; integer images are rescaled to [0, 1], float images are kept as is."""
    return tf.image.convert_image_dtype(image, tf.float32)


def random_apply(fn: Callable[[tf.Tensor], tf.Tensor], p: float, image: tf.Tensor) -> tf.Tensor:
    """Applies `fn` with probability `p`, decided by one uniform draw per call (i.e. per image).

    `fn` runs inside a `tf.cond` branch, so it should not draw random numbers itself: draw them
    before and close over them (see the note above `random_brightness`).
    """
    apply = tf.random.uniform([], 0.0, 1.0) < p
    return tf.cond(apply, lambda: fn(image), lambda: image)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bicubic resize to a square `image_size`; values may overshoot [0, 1] slightly."""
    return tf.image.resize(image, [image_size, image_size], method=tf.image.ResizeMethod.BICUBIC)


def resize_if_needed(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes only when the spatial size differs, so same-size inputs pass through bit-exact."""
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    return tf.cond(same, lambda: image, lambda: resize(image, image_size))


def sample_crop_box(
    image_shape: tf.Tensor,
    *,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = CROP_ASPECT_RATIO_RANGE,
    min_object_covered: float = CROP_MIN_OBJECT_COVERED,
    max_attempts: int = CROP_MAX_ATTEMPTS,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples an Inception-style crop box for an image of shape `image_shape` ([H, W, C]).

    The whole image is the only "object", so `min_object_covered` also acts as a lower bound on
    the relative area. When no box satisfies the constraints within `max_attempts`, the op returns
    the whole image. The op's seed is drawn from the global stateful RNG so that
    `tf.random.set_seed` makes the boxes reproducible.

    Returns:
      (offset, size): int32 tensors [y, x] and [height, width] of the box in pixels.
    """
    seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def random_resized_crop(
    image: tf.Tensor,
    image_size: int,
    *,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = CROP_ASPECT_RATIO_RANGE,
    min_object_covered: float = CROP_MIN_OBJECT_COVERED,
    max_attempts: int = CROP_MAX_ATTEMPTS,
) -> tf.Tensor:
    """Crops a random box (see `sample_crop_box`) and resizes it bicubically to `image_size`."""
    offset, size = sample_crop_box(
        tf.shape(image),
        area_range=area_range,
        aspect_ratio_range=aspect_ratio_range,
        min_object_covered=min_object_covered,
        max_attempts=max_attempts,
    )
    crop = tf.image.crop_to_bounding_box(image, offset[0], offset[1], size[0], size[1])
    return resize(crop, image_size)


def center_crop_and_resize(
    image: tf.Tensor, image_size: int, crop_proportion: float = CROP_PROPORTION
) -> tf.Tensor:
    """Crops a centred square of side `crop_proportion * min(H, W)` and resizes it bicubically.

    A square target makes the aspect-preserving crop a square on the shorter side; odd margins
    put the extra pixel before the crop.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.cast(
        tf.math.rint(crop_proportion * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    offset_y = (height - side + 1) // 2
    offset_x = (width - side + 1) // 2
    crop = tf.image.crop_to_bounding_box(image, offset_y, offset_x, side, side)
    return resize(crop, image_size)


# Randomness and branches: a stateful random op created inside a `tf.cond` / `tf.switch_case`
# branch takes its op seed from the branch graph's own op counter, so under a global seed
# (`tf.random.set_seed`, which the Trainer sets) structurally identical branches (the jitter
# steps, the two views of an image) would replay one random sequence. Every parameter is
# therefore drawn in the caller's graph first, and branches only apply deterministic ops.


def _sample_factor(max_delta: float) -> tf.Tensor:
    return tf.random.uniform([], max(1.0 - max_delta, 0.0), 1.0 + max_delta)


def _sample_offset(max_delta: float) -> tf.Tensor:
    return tf.random.uniform([], -max_delta, max_delta)


def _brightness_fn(max_delta: float, impl: str) -> Callable[[tf.Tensor], tf.Tensor]:
    if impl == "v2":
        factor = _sample_factor(max_delta)
        return lambda image: image * factor
    delta = _sample_offset(max_delta)
    return lambda image: tf.image.adjust_brightness(image, delta)


def _contrast_fn(max_delta: float) -> Callable[[tf.Tensor], tf.Tensor]:
    factor = _sample_factor(max_delta)
    return lambda image: tf.image.adjust_contrast(image, factor)


def _saturation_fn(max_delta: float) -> Callable[[tf.Tensor], tf.Tensor]:
    factor = _sample_factor(max_delta)
    return lambda image: tf.image.adjust_saturation(image, factor)


def _hue_fn(max_delta: float) -> Callable[[tf.Tensor], tf.Tensor]:
    delta = _sample_offset(max_delta)
    return lambda image: tf.image.adjust_hue(image, delta)


def random_brightness(image: tf.Tensor, max_delta: float, *, impl: str = "v2") -> tf.Tensor:
    """Random brightness change.

    "v2" (SimCLRv2) scales by a factor in [max(1 - max_delta, 0), 1 + max_delta], which keeps black
    black; "v1" (SimCLRv1) adds an offset in [-max_delta, max_delta].
    """
    _check_impl(impl)
    return _brightness_fn(max_delta, impl)(image)


def random_contrast(image: tf.Tensor, max_delta: float) -> tf.Tensor:
    """Scales each channel's deviation from its mean by a factor in [max(1 - d, 0), 1 + d]."""
    return _contrast_fn(max_delta)(image)


def random_saturation(image: tf.Tensor, max_delta: float) -> tf.Tensor:
    """Scales HSV saturation by a factor in [max(1 - d, 0), 1 + d]."""
    return _saturation_fn(max_delta)(image)


def random_hue(image: tf.Tensor, max_delta: float) -> tf.Tensor:
    """Rotates the hue by an offset in [-max_delta, max_delta] (fraction of the hue circle)."""
    return _hue_fn(max_delta)(image)


def sample_color_jitter(strength: float, *, impl: str = "v2") -> Callable[[tf.Tensor], tf.Tensor]:
    """Draws one image's colour-jitter parameters now and returns the jitter that applies them.

    Brightness, contrast, saturation (0.8 * strength) and hue (0.2 * strength) run in a random
    order, clipping to [0, 1] after each, for both impls; the impls differ only in the brightness
    rule (see `random_brightness`). Lower factor bounds are clamped at 0 so strengths above 1.25
    stay valid. A transform whose magnitude is 0 is skipped, so `strength=0` is the identity.
    """
    _check_impl(impl)
    if strength < 0:
        raise ValueError(f"color_jitter_strength must be >= 0, got {strength}")
    makers = [
        (functools.partial(_brightness_fn, impl=impl), 0.8 * strength),
        (_contrast_fn, 0.8 * strength),
        (_saturation_fn, 0.8 * strength),
        (_hue_fn, 0.2 * strength),
    ]
    transforms = [make(magnitude) for make, magnitude in makers if magnitude > 0]
    if not transforms:
        return lambda image: image
    order = tf.random.shuffle(tf.range(len(transforms)))

    def jitter(image: tf.Tensor) -> tf.Tensor:
        for step in range(len(transforms)):
            branches = [functools.partial(fn, image) for fn in transforms]
            image = tf.clip_by_value(tf.switch_case(order[step], branches), 0.0, 1.0)
        return image

    return jitter


def color_jitter(image: tf.Tensor, strength: float, *, impl: str = "v2") -> tf.Tensor:
    """Random-order colour jitter with parameters drawn for this image (`sample_color_jitter`)."""
    return sample_color_jitter(strength, impl=impl)(image)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Converts RGB to luma and repeats it on 3 channels so the model input shape is unchanged."""
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def random_color_distort(
    image: tf.Tensor,
    *,
    strength: float = 1.0,
    impl: str = "v2",
    jitter_prob: float = JITTER_PROB,
    grayscale_prob: float = GRAYSCALE_PROB,
) -> tf.Tensor:
    """Colour jitter with probability `jitter_prob`, then grayscale with probability
    `grayscale_prob`, each decided independently per image."""
    jitter = sample_color_jitter(strength, impl=impl)
    image = random_apply(jitter, jitter_prob, image)
    return random_apply(to_grayscale, grayscale_prob, image)


def gaussian_blur(image: tf.Tensor, kernel_size: int, sigma: tf.Tensor) -> tf.Tensor:
    """Blurs an image ([H, W, C] or [B, H, W, C], float) with a separable Gaussian, zero 'SAME'
    padding.

    The kernel has radius `kernel_size // 2`, so it spans `2 * radius + 1` taps (an even size is
    rounded up). A radius of 0 (kernel_size < 2) is a 1-tap kernel, i.e. the identity, and the
    image is returned unchanged.
    """
    radius = kernel_size // 2
    if radius <= 0:
        return image
    taps = tf.range(-radius, radius + 1, dtype=image.dtype)
    sigma = tf.cast(sigma, image.dtype)
    weights = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
    weights /= tf.reduce_sum(weights)
    single = image.shape.rank == 3
    batch = image[tf.newaxis] if single else image
    # Each channel as its own 1-channel image and plain conv2d: TF 2.16's oneDNN depthwise
    # convolution crashes the process for 1xK filters with K >= 15 (ImageNet's 22-px kernel).
    shape = tf.shape(batch)
    planes = tf.reshape(tf.transpose(batch, [0, 3, 1, 2]), [-1, shape[1], shape[2], 1])
    planes = tf.nn.conv2d(planes, tf.reshape(weights, [1, -1, 1, 1]), 1, padding="SAME")
    planes = tf.nn.conv2d(planes, tf.reshape(weights, [-1, 1, 1, 1]), 1, padding="SAME")
    planes = tf.reshape(planes, [shape[0], shape[3], shape[1], shape[2]])
    batch = tf.transpose(planes, [0, 2, 3, 1])
    return batch[0] if single else batch


def sample_blur_sigma(sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE) -> tf.Tensor:
    """Draws one blur sigma uniformly from `sigma_range`; called per image, so sigmas vary."""
    return tf.random.uniform([], sigma_range[0], sigma_range[1])


def random_blur(
    image: tf.Tensor,
    kernel_size: int,
    *,
    p: float = BLUR_PROB,
    sigma_range: tuple[float, float] = BLUR_SIGMA_RANGE,
) -> tf.Tensor:
    """Gaussian blur with probability `p` and a sigma drawn for this image alone."""
    sigma = sample_blur_sigma(sigma_range)
    return random_apply(lambda x: gaussian_blur(x, kernel_size, sigma), p, image)


def preprocess_for_train(
    image: tf.Tensor,
    image_size: int,
    *,
    color_distort: bool,
    color_jitter_strength: float = 1.0,
    color_jitter_impl: str = "v2",
    use_blur: bool = False,
    crop: bool = True,
    flip: bool = True,
) -> tf.Tensor:
    """Produces one SimCLR view: float32 [image_size, image_size, 3] in [0, 1].

    Blur uses kernel size `image_size // 10`, hence is a no-op for `image_size < 20` (see
    `gaussian_blur`); its sigma is drawn per image. Without `crop`, an input of another size is
    resized to `image_size`.
    """
    _check_impl(color_jitter_impl)
    image = to_float_image(image)
    if crop:
        image = random_resized_crop(image, image_size)
    else:
        image = resize_if_needed(image, image_size)
    if flip:
        image = tf.image.random_flip_left_right(image)
    if color_distort:
        image = random_color_distort(image, strength=color_jitter_strength, impl=color_jitter_impl)
    if use_blur:
        image = random_blur(image, image_size // 10)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def preprocess_for_eval(
    image: tf.Tensor, image_size: int, *, center_crop: bool = True
) -> tf.Tensor:
    """Deterministic eval view: float32 [image_size, image_size, 3] in [0, 1].

    With `center_crop` and `image_size > 32`, keeps the central `CROP_PROPORTION` of the shorter
    side and resizes; otherwise only resizes if the input size differs.
    """
    image = to_float_image(image)
    if center_crop and image_size > EVAL_CROP_MIN_SIZE:
        image = center_crop_and_resize(image, image_size)
    else:
        image = resize_if_needed(image, image_size)
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [image_size, image_size, 3])
