"""Input checks shared by the strategies: each says what was expected."""

from __future__ import annotations

import numpy as np

from ml_backend.errors import SelectionInputError


def is_number(value) -> bool:
    """A real number, not a bool."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def validated_mask(labeled_mask) -> np.ndarray:
    if hasattr(labeled_mask, "detach"):
        labeled_mask = labeled_mask.detach().cpu().numpy()
    mask = np.asarray(labeled_mask)
    if mask.ndim != 1:
        raise SelectionInputError(f"labeled_mask must be 1-D [N], got shape {mask.shape}")
    if mask.dtype != bool:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise SelectionInputError("labeled_mask must be booleans (True = labeled) or 0/1")
        mask = mask.astype(bool)
    return mask


def check_rows(name: str, array, n: int) -> None:
    rows = np.shape(array)[0] if array is not None and np.ndim(array) else None
    if array is not None and rows != n:
        raise SelectionInputError(
            f"{name} has {rows} rows but labeled_mask has {n}; "
            "all three must describe the same pool, row for row"
        )
