"""Make the mixture-of-experts goldens in this folder (a tool for making test data, not a test).

mergekit is no dependency of the project: run this with the Python of a virtual
environment where mergekit 0.1.5 is installed (its transformers 5 converts the models'
per-expert tensors to the fused layout on reading):

    VENV/bin/python tests/data/mergekit_moe/make_moe_goldens.py --models   # rebuild models/, then every case
    VENV/bin/python tests/data/mergekit_moe/make_moe_goldens.py [CASE ...]

`--models` writes three tiny Mixtral models (base and two fine-tunes, from fixed seeds) in
the layout the Hub's Mixtral checkpoints store (`block_sparse_moe.experts.E.w1.weight`...).
Each case's `recipe.yml` is run with `mergekit-yaml recipe.yml OUT --random-seed 42 --device
cpu --no-copy-tokenizer` from this folder (the recipes name the models relative to it), and
mergekit's `model.safetensors` is kept as `expected.safetensors`, byte for byte.

Made with mergekit 0.1.5, torch 2.13.0+cpu, transformers 5.24.0, safetensors 0.8.0, Python 3.11.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
H, I, V, LAYERS, EXPERTS, HEADS = 16, 12, 32, 2, 3, 2

CASES = {
    "ties": """merge_method: ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ./models/ft2
    parameters: {weight: 0.7, density: 0.5}
dtype: float32
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 1.0, density: 0.6, gamma: 0.1}
  - model: ./models/ft2
    parameters: {weight: 0.5, density: 0.6, gamma: 0.1}
dtype: float32
""",
    "model_stock": """merge_method: model_stock
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft2
dtype: float32
""",
    "linear_filter_mlp": """merge_method: linear
models:
  - model: ./models/ft1
    parameters:
      weight: [{filter: mlp, value: 0.9}, {value: 0.5}]
  - model: ./models/ft2
    parameters:
      weight: [{filter: mlp, value: 0.1}, {value: 0.5}]
dtype: float32
""",
}


def config() -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
            "vocab_size": V, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
            "hidden_act": "silu", "head_dim": H // HEADS, "router_jitter_noise": 0.0, "sliding_window": None}


def stored_layout(seed: int, base: dict[str, torch.Tensor] | None, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "block_sparse_moe.gate.weight": (EXPERTS, H)}
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (H, H)
        for e in range(EXPERTS):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (I, H), q + "w2.weight": (H, I), q + "w3.weight": (I, H)}
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g) * scale
        out[name] = (base[name] + noise) if base is not None else noise
    return out


def build_models() -> None:
    models = HERE / "models"
    shutil.rmtree(models, ignore_errors=True)
    base = stored_layout(0, None, 0.1)
    for name, tensors in (("base", base), ("ft1", stored_layout(1, base, 0.03)), ("ft2", stored_layout(2, base, 0.05))):
        directory = models / name
        directory.mkdir(parents=True)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config(), indent=2) + "\n")


def run(case: str) -> bool:
    folder = HERE / "cases" / case
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yml").write_text(CASES[case])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        result = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(folder / "recipe.yml"),
                                 str(out), "--random-seed", "42", "--device", "cpu", "--no-copy-tokenizer"],
                                cwd=HERE, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{case}: mergekit failed:\n{result.stderr[-2000:]}")
            return False
        shutil.copyfile(out / "model.safetensors", folder / "expected.safetensors")
    print(f"{case}: ok")
    return True


def main(argv: list[str]) -> int:
    if "--models" in argv:
        build_models()
        argv = [a for a in argv if a != "--models"]
    cases = argv or list(CASES)
    return 0 if all([run(case) for case in cases]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
