"""NearSwap: take the other model's value where it is near the base's, the base's elsewhere."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import merge_method

# |base - model| is floored here so that equal entries do not divide by zero (their weight clamps to 1).
DIFF_FLOOR = 1e-6


@merge_method(
    "nearswap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description="Per entry, w = clamp(t / |base - model|, 0, 1): w * model + (1 - w) * base; "
                "entries within t of the base become the model's.",
    min_models=1,
    max_models=1,
    elementwise=True,
)
def nearswap(tensors: list[torch.Tensor], *, base: torch.Tensor, t: float) -> torch.Tensor:
    (other,) = tensors
    # mergekit's t / d is torch's reciprocal(d) * t: the same two roundings here, in place.
    weight = torch.sub(base, other).abs_().clamp_(min=DIFF_FLOOR).reciprocal_().mul_(t).clamp_(0, 1)
    out = torch.mul(weight, other)
    # 1 - w as -w + 1 (negation is exact, so the same number), then times the base.
    out += weight.neg_().add_(1).mul_(base)
    return out
