"""What the values of a tensor hold: shared by the writer (which counts them), the readers and verify."""

from __future__ import annotations

import math

import torch


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values a floating tensor holds (0 for other dtypes)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    # 8-bit floats have no isfinite kernel: widened first (they are small).
    values = tensor.float() if tensor.element_size() == 1 else tensor
    # The usual answer, 0, from one reduction without temporaries (aminmax propagates NaN): for a
    # bf16 embedding 60 times faster than counting the entries that are not finite.
    low, high = torch.aminmax(values)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return 0
    return int((~torch.isfinite(values)).sum().item())
