"""``IMAGE_SIZE=auto``: the square size a project's images are trained and predicted at.

The pool's typical size (median of the larger side), rounded up to a multiple of 32 and at most
224: 28 px digits train at 32 px instead of 224 (49x fewer pixels per image, and nothing to
gain from upsampling), webcam photos at 224 as before.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MULTIPLE = 32
LARGEST = 224


def choose_image_size(native_sizes: Iterable[tuple[int, int]]) -> int:
    """The size for images whose ``(width, height)`` are ``native_sizes`` (224 when empty)."""
    sides = [max(int(w), int(h)) for w, h in native_sizes]
    if not sides:
        return LARGEST
    typical = float(np.median(sides))
    return int(min(LARGEST, max(MULTIPLE, MULTIPLE * np.ceil(typical / MULTIPLE))))
