"""Make mergekit's kernel-level goldens in kernels/ (a tool for making test data, not a test).

mergekit's recipe goldens (make_goldens.py) cannot pin DELLA bit for bit: its masks come
from torch's global RNG, drawn in an order the recipe runner decides. This script calls
mergekit's kernels directly, on small tensors made from fixed seeds, right after
``torch.manual_seed(SEED)``, and stores the inputs, the seeds and the outputs. A CPU
``torch.Generator`` seeded with SEED draws the same stream as the global generator after
``torch.manual_seed(SEED)``, so tests/test_methods_task_family.py hands our kernels such a
generator and must get the same bits. The deterministic methods (sce, ram, ramplus_tl) are
stored the same way, without seeds.

Run it with the Python of the environment where mergekit is installed, from anywhere:

    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_kernel_goldens.py          # write
    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_kernel_goldens.py --check  # compare only

The files in kernels/ were made with mergekit 0.1.5, torch 2.13.0+cpu, safetensors 0.8.0,
Python 3.11, on CPU. Each file's metadata key "cases" is a JSON list; a case names its
kernel (``della_magprune`` for mergekit's sparsification alone, else a method name), its
parameters, its input tensors (``KEY.base``, ``KEY.model0`` ...) and its output ``KEY.out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "kernels"

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {"float32": F32, "bfloat16": BF16, "float16": F16}


def _inputs(seed: int, shape: tuple[int, ...], n_models: int, dtype: torch.dtype,
            sparse: float = 0.0, ties: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models near it; ``sparse``: that fraction of each task vector is exactly 0
    (or below 1e-5), so overlap counts have both kinds; ``ties``: task vectors of few values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    models = []
    for _ in range(n_models):
        delta = torch.randn(shape, generator=g)
        if ties:
            delta = torch.randint(-3, 4, shape, generator=g).float() / 4
        if sparse:
            drop = torch.rand(shape, generator=g) < sparse
            tiny = torch.rand(shape, generator=g) < 0.5
            delta = torch.where(drop, torch.where(tiny, delta * 1e-7, torch.zeros(())), delta)
        models.append((base.float() + delta).to(dtype))
    return base, models


def _case(kernel: str, key: str, dtype: torch.dtype, base: torch.Tensor, models: list[torch.Tensor],
          params: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    return {"kernel": kernel, "key": key, "dtype": str(dtype).removeprefix("torch."), "seed": seed,
            "params": params, "models": len(models), "_base": base, "_models": models}


def della_cases() -> list[dict[str, Any]]:
    cases = []
    # mergekit's sparsification alone: one model, x - base, its rows ranked (dim 1).
    for i, (shape, dtype, density, epsilon, rescale, ties) in enumerate([
        ((4, 8), F32, 0.5, 0.2, True, False),
        ((33,), F32, 0.4, 0.3, True, False),
        ((4, 8), BF16, 0.6, 0.1, True, False),
        ((1, 300), BF16, 0.5, 0.25, True, False),  # ranks above 256: inexact in bf16
        ((3, 4, 5), F32, 0.5, 0.2, False, False),  # 3-D: ranked along dim 1
        ((4, 8), F16, 0.5, 0.2, True, False),  # float16 on CPU works in float32
        ((4, 10), F32, 0.5, 0.4, True, True),  # many equal magnitudes: the argsort's tie order
    ]):
        base, models = _inputs(100 + i, shape, 1, dtype, ties=ties)
        params = {"density": density, "epsilon": epsilon, "rescale": rescale}
        cases.append(_case("della_magprune", f"magprune{i}", dtype, base, models, params, seed=1000 + i))
    # The whole kernels: one draw per model in model order; density 1 draws nothing.
    for i, (method, dtype, params) in enumerate([
        ("della", F32, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.4], "epsilon": [0.2, 0.1, 0.15]}),
        ("della", BF16, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 1.0, 0.4], "epsilon": [0.2, 0.1, 0.15],
                         "lambda": 1.5}),
        ("della", F32, {"weight": [0.3, 0.7, 1.0], "density": [0.6, 0.6, 0.6], "epsilon": [0.1, 0.1, 0.1],
                        "normalize": False, "rescale": False}),
        ("della_linear", F32, {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.4],
                               "epsilon": [0.2, 0.1, 0.15]}),
        ("della_linear", BF16, {"weight": [0.6, 0.4, 1.0], "density": [0.3, 0.5, 1.0],
                                "epsilon": [0.1, 0.2, 0.15], "normalize": True, "lambda": 0.9}),
    ]):
        base, models = _inputs(200 + i, (4, 8), 3, dtype)
        cases.append(_case(method, f"{method}{i}", dtype, base, models, params, seed=2000 + i))
    return cases


def sce_cases() -> list[dict[str, Any]]:
    cases = []
    for i, (dtype, params, sparse) in enumerate([
        (F32, {}, 0.0),
        (F32, {"select_topk": 0.3}, 0.0),
        (BF16, {"select_topk": 0.5}, 0.0),
        (BF16, {}, 0.3),
        (F32, {"select_topk": 0.7}, 0.5),  # some entries no model changes: zero variance
        (F32, {"select_topk": 0.0}, 0.0),
    ]):
        base, models = _inputs(300 + i, (5, 8), 3, dtype, sparse=sparse)
        cases.append(_case("sce", f"sce{i}", dtype, base, models, params))
    return cases


def ram_cases() -> list[dict[str, Any]]:
    cases = []
    for i, (method, dtype, params, n_models) in enumerate([
        ("ram", F32, {}, 3),
        ("ram", BF16, {}, 3),
        ("ram", F32, {"epsilon": 0.5}, 4),
        ("ramplus_tl", F32, {}, 3),
        ("ramplus_tl", BF16, {}, 3),
        ("ramplus_tl", F32, {"r": 0.5, "alpha": 0.8, "epsilon": 0.3}, 4),
    ]):
        base, models = _inputs(400 + i, (5, 8), n_models, dtype, sparse=0.5)
        cases.append(_case(method, f"{method}{i}", dtype, base, models, params))
    return cases


def run_case(case: dict[str, Any]) -> torch.Tensor:
    """mergekit's output for one case, on inputs already in the case's dtype (as its runner casts them)."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import RescaleNorm, della_magprune

    base, models, params = case["_base"], case["_models"], dict(case["params"])
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    if case["kernel"] == "della_magprune":
        norm = RescaleNorm.l1 if params["rescale"] else None
        return della_magprune(models[0] - base, params["density"], params["epsilon"], rescale_norm=norm)
    group = TensorGroup.from_tensors([base, *models], base_index=0, name=case["key"])
    (out,) = merge_methods.get(case["kernel"])((group,), parameters=params)
    return out


def build(name: str, cases: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], str]:
    tensors: dict[str, torch.Tensor] = {}
    for case in cases:
        tensors[f"{case['key']}.base"] = case["_base"].contiguous()
        for j, model in enumerate(case["_models"]):
            tensors[f"{case['key']}.model{j}"] = model.contiguous()
        tensors[f"{case['key']}.out"] = run_case(case).contiguous()
    meta = json.dumps([{k: v for k, v in c.items() if not k.startswith("_")} for c in cases])
    return tensors, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rerun and compare with the stored files")
    args = parser.parse_args()
    failed = False
    for name, cases in (("della", della_cases()), ("sce", sce_cases()), ("ram", ram_cases())):
        tensors, meta = build(name, cases)
        path = KERNELS / f"{name}.safetensors"
        if args.check:
            stored = load_file(path)
            bad = [k for k in tensors if k not in stored or not torch.equal(stored[k], tensors[k])
                   or stored[k].dtype != tensors[k].dtype]
            print(f"{path.name}: {'ok' if not bad else f'{len(bad)} differ, e.g. {bad[:3]}'}")
            failed |= bool(bad)
        else:
            KERNELS.mkdir(exist_ok=True)
            save_file(tensors, path, metadata={"cases": meta})
            print(f"wrote {path} ({path.stat().st_size} bytes, {len(cases)} cases)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
