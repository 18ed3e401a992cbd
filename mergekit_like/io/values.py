"""What the values of a tensor hold: shared by the writer (which counts them), the readers and verify."""

from __future__ import annotations

import torch


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values a floating tensor holds (0 for other dtypes)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    # 8-bit floats have no isfinite kernel: widened first (they are small).
    return int((~torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor)).sum().item())
