"""Make kernels/spherical.safetensors: mergekit 0.1.5's own kernel outputs (test data, not a test).

For nuslerp, multislerp, karcher, nearswap, arcee_fusion and passthrough this calls
mergekit's merge methods directly (no recipe, no checkpoint) on small tensors made here
from fixed seeds, in float32 and bfloat16, and stores inputs and outputs;
tests/test_methods_spherical.py runs this project's kernels on the same inputs and
requires the same bits. mergekit is never imported by a test: run this script with the
reference environment's Python, from anywhere:

    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_spherical_goldens.py          # write
    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_spherical_goldens.py --check  # compare only

Made with mergekit 0.1.5, torch 2.13.0+cpu, on CPU, two threads (as the tests run).

File layout: tensor ``CASE/model0``, ``CASE/model1``, ... and ``CASE/base`` (if any) are the
inputs in the compute dtype, ``CASE/expected`` mergekit's output; the metadata entry ``CASE``
is JSON ``{"method", "params", "models", "base"}``, ``params`` in mergekit's (and this
project's) names, per-model values as lists in model order. One arcee_fusion case has
more than a million entries, where mergekit samples the quantiles with torch's global
generator: its inputs are not stored but remade from ``"generated": {"seed", "shape"}``
(input i is ``torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))`` in
float32, then cast; the base is the last input), the global generator is seeded with
``"sample_seed"`` just before the call, and ``CASE/expected_sha256`` holds the SHA-256 of
the output's bytes instead of the output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent / "kernels" / "spherical.safetensors"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generated_inputs(spec: dict[str, Any], count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The inputs of a case too large to store (the test remakes them the same way)."""
    return [randn(spec["seed"] + i, *spec["shape"]).to(dtype) for i in range(count)]


def _nuslerp_rows() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows of every kind: generic, parallel, antiparallel, zero."""
    x0 = randn(10, 6, 8)
    x1 = randn(11, 6, 8)
    x1[1] = 2.5 * x0[1]
    x1[2] = -0.5 * x0[2]
    x0[3] = 0
    base = randn(12, 6, 8) * 0.1
    return [x0, x1], base


def _antipodal() -> tuple[list[torch.Tensor], torch.Tensor]:
    base = randn(20, 5, 7)
    delta = randn(21, 5, 7)
    return [base + delta, base - delta], base


def _with_zero_model() -> list[torch.Tensor]:
    return [randn(30, 4, 9), torch.zeros(4, 9), randn(31, 4, 9)]


def _near(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    base = randn(seed, 8, 16)
    return [base + 0.02 * randn(seed + 1, 8, 16)], base


def _fusion(seed: int, *shape: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    base = randn(seed, *shape)
    change = 0.05 * randn(seed + 1, *shape)
    change[..., ::7] *= 20  # a few large changes, for the outlier threshold to find
    return [base + change], base


# name -> (method, params, make inputs: (models, base or None))
Make = Callable[[], tuple[list[torch.Tensor], "torch.Tensor | None"]]
CASES: dict[str, tuple[str, dict[str, Any], Make]] = {
    "nuslerp_flat": ("nuslerp", {"weight": [0.3, 0.7]}, lambda: ([randn(1, 12, 10), randn(2, 12, 10)], None)),
    "nuslerp_flat_base": ("nuslerp", {"weight": [2.0, 1.0]},
                          lambda: ([randn(1, 12, 10), randn(2, 12, 10)], randn(3, 12, 10))),
    "nuslerp_rows": ("nuslerp", {"weight": [1.0, 3.0], "nuslerp_flatten": False}, lambda: (_nuslerp_rows()[0], None)),
    "nuslerp_rows_base": ("nuslerp", {"weight": [1.0, 3.0], "nuslerp_flatten": False}, _nuslerp_rows),
    "nuslerp_columns": ("nuslerp", {"weight": [0.6, 0.4], "nuslerp_flatten": False, "nuslerp_row_wise": True},
                        lambda: ([randn(4, 7, 5), randn(5, 7, 5)], None)),
    "nuslerp_columns_3d": ("nuslerp", {"weight": [0.6, 0.4], "nuslerp_flatten": False, "nuslerp_row_wise": True},
                           lambda: ([randn(6, 3, 4, 5), randn(7, 3, 4, 5)], randn(8, 3, 4, 5))),
    "nuslerp_weights_cancel": ("nuslerp", {"weight": [1.0, -1.0]}, lambda: ([randn(1, 33), randn(2, 33)], None)),
    "nuslerp_colinear": ("nuslerp", {"weight": [0.25, 0.75]}, lambda: ([randn(9, 40), 3 * randn(9, 40)], None)),
    "multislerp_three": ("multislerp", {"weight": [0.2, 0.5, 0.3]},
                         lambda: ([randn(40 + i, 6, 11) for i in range(3)], None)),
    "multislerp_three_base": ("multislerp", {"weight": [1.0, 2.0, 0.5]},
                              lambda: ([randn(40 + i, 6, 11) for i in range(3)], randn(43, 6, 11))),
    "multislerp_unnormalized": ("multislerp", {"weight": [0.4, 0.9], "normalize_weights": False, "eps": 1e-6},
                                lambda: ([randn(44, 50), randn(45, 50)], randn(46, 50))),
    "multislerp_antipodal": ("multislerp", {"weight": [0.5, 0.5]}, _antipodal),
    "multislerp_single": ("multislerp", {"weight": [2.0]}, lambda: ([randn(47, 3, 3)], randn(48, 3, 3))),
    "karcher_three": ("karcher", {}, lambda: ([randn(50 + i, 8, 12) for i in range(3)], None)),
    "karcher_two_short": ("karcher", {"max_iter": 2, "tol": 1e-7}, lambda: ([randn(53, 70), randn(54, 70)], None)),
    "karcher_zero_model": ("karcher", {}, lambda: (_with_zero_model(), None)),
    "karcher_close": ("karcher", {"max_iter": 50},
                      lambda: ([randn(55, 30), randn(55, 30) + 1e-3 * randn(56, 30), randn(57, 30)], None)),
    "nearswap_small_t": ("nearswap", {"t": 0.01}, lambda: _near(60)),
    "nearswap_large_t": ("nearswap", {"t": 0.05}, lambda: _near(62)),
    "arcee_fusion_matrix": ("arcee_fusion", {}, lambda: _fusion(70, 12, 24)),
    "arcee_fusion_vector": ("arcee_fusion", {}, lambda: _fusion(72, 200)),
    "arcee_fusion_3d": ("arcee_fusion", {}, lambda: _fusion(74, 3, 5, 16)),
    "passthrough_plain": ("passthrough", {}, lambda: ([randn(80, 4, 6)], None)),
    "passthrough_scaled": ("passthrough", {"scale": [0.3]}, lambda: ([randn(81, 4, 6)], None)),
}
# More entries than mergekit's quantile sample, so it samples.
SAMPLED = {"arcee_fusion_sampled": ({"seed": 90, "shape": [1001, 1000]}, 1234)}


def mergekit_kernel(method: str, models: list[torch.Tensor], base: torch.Tensor | None,
                    params: dict[str, Any]) -> torch.Tensor:
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    tensors = models + ([base] if base is not None else [])
    group = TensorGroup.from_tensors(tensors, base_index=len(models) if base is not None else None)
    (out,) = merge_methods.get(method)([group], parameters=params)
    return out


def make() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for case, (method, params, inputs) in CASES.items():
        for tag, dtype in DTYPES.items():
            name = f"{case}_{tag}"
            made_models, made_base = inputs()
            models = [x.to(dtype) for x in made_models]
            base = made_base.to(dtype) if made_base is not None else None
            expected = mergekit_kernel(method, [x.clone() for x in models],
                                       base.clone() if base is not None else None, params)
            for i, x in enumerate(models):
                tensors[f"{name}/model{i}"] = x
            if base is not None:
                tensors[f"{name}/base"] = base
            tensors[f"{name}/expected"] = expected.contiguous()
            metadata[name] = json.dumps({"method": method, "params": params, "models": len(models),
                                         "base": base is not None})
    for case, (spec, sample_seed) in SAMPLED.items():
        for tag, dtype in DTYPES.items():
            name = f"{case}_{tag}"
            model, base = generated_inputs(spec, 2, dtype)
            torch.manual_seed(sample_seed)
            expected = mergekit_kernel("arcee_fusion", [model], base, {})
            digest = hashlib.sha256(expected.contiguous().view(torch.uint8).numpy().tobytes()).digest()
            tensors[f"{name}/expected_sha256"] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
            metadata[name] = json.dumps({"method": "arcee_fusion", "params": {}, "models": 1, "base": True,
                                         "generated": spec, "sample_seed": sample_seed,
                                         "dtype": str(dtype).removeprefix("torch.")})
    return tensors, metadata


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="remake and compare with the stored file; write nothing")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tensors, metadata = make()
    if args.check:
        stored = load_file(OUT)
        differ = sorted(k for k in tensors if k not in stored or not torch.equal(tensors[k], stored[k]))
        differ += sorted(set(stored) - set(tensors))
        print("\n".join(differ) or f"{len(tensors)} tensors agree")
        return 1 if differ else 0
    OUT.parent.mkdir(exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {len(metadata)} cases to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
