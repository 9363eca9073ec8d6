"""NumPy references for the deterministic image geometry of the input pipelines.

Written from the definitions (Keys cubic convolution, half-pixel centres, the eval centre crop),
not from TensorFlow, so that tests compare TensorFlow's pipeline against an independent result.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

# Keys' cubic convolution parameter used by TensorFlow's and PIL's bicubic resampling.
KEYS_A = -0.5


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = KEYS_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.cache
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of a 1-D bicubic resize without antialiasing.

    Output sample j sits at input coordinate (j + 0.5) * in/out - 0.5 (pixel centres aligned);
    it mixes the 4 nearest input samples; samples outside the image get no weight and the rest
    are renormalised to sum to 1.
    """
    matrix = np.zeros([out_size, in_size])
    for j in range(out_size):
        center = (j + 0.5) * in_size / out_size - 0.5
        first = int(np.floor(center)) - 1
        taps = np.arange(first, first + 4)
        weights = _keys_cubic(taps - center)
        inside = (taps >= 0) & (taps < in_size)
        matrix[j, taps[inside]] = weights[inside] / weights[inside].sum()
    matrix.flags.writeable = False  # shared by the cache
    return matrix


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float [H, W, C] image to [height, width, C] (separable)."""
    rows = bicubic_matrix(image.shape[0], height)
    cols = bicubic_matrix(image.shape[1], width)
    return np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), cols)


def center_crop(image: np.ndarray, proportion: float) -> np.ndarray:
    """The centred square of side round(proportion * shorter side); odd margins put the extra
    pixel before the crop."""
    height, width = image.shape[:2]
    side = int(np.rint(proportion * min(height, width)))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return image[top : top + side, left : left + side]


def decode(data: bytes) -> np.ndarray:
    """uint8 RGB pixels of an encoded image, decoded by PIL."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
