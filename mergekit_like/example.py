"""Built-in example checkpoints: a small Llama-style base model and fine-tunes of it.

Used by ``mergekit-like example``, the demo, the tests and the benchmarks, so
nothing ever has to be downloaded. Weights are random but deterministic (one
seed per model and tensor), and each fine-tune is the base plus a small,
model-specific perturbation, which is the structure merge methods assume.
Tensors are generated and written one at a time, so even a billion-parameter
example needs only a tensor's worth of memory.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_like.io.atomic import atomic_directory
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.sidefiles import write_config
from mergekit_like.io.writer import ShardedWriter


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama-style decoder; the defaults make a 0.2M-parameter toy."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Presets for benchmarks: roughly the named parameter counts.
PRESETS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(),
    "270m": LlamaShape(32000, 1024, 2816, 16, 16, 16),
    "1b": LlamaShape(32000, 2048, 5632, 22, 32, 4),
}


def llama_tensor_specs(shape: LlamaShape, dtype: torch.dtype) -> list[TensorSpec]:
    """The tensor names and shapes of ``LlamaForCausalLM`` for ``shape``, in state-dict order."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * shape.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", dtype, (v, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", dtype, (h, h)),
            TensorSpec(p + "self_attn.k_proj.weight", dtype, (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", dtype, (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", dtype, (h, h)),
            TensorSpec(p + "mlp.gate_proj.weight", dtype, (i, h)),
            TensorSpec(p + "mlp.up_proj.weight", dtype, (i, h)),
            TensorSpec(p + "mlp.down_proj.weight", dtype, (h, i)),
            TensorSpec(p + "input_layernorm.weight", dtype, (h,)),
            TensorSpec(p + "post_attention_layernorm.weight", dtype, (h,)),
        ]
    specs += [TensorSpec("model.norm.weight", dtype, (h,)), TensorSpec("lm_head.weight", dtype, (v, h))]
    return specs


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict[str, object]:
    """A config.json that transformers loads as ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(shape),
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype_name(dtype),
    }


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _noise(spec: TensorSpec, seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed(seed, spec.name))
    return scale * torch.randn(spec.shape, generator=generator)


def model_tensors(
    specs: list[TensorSpec], *, finetune: int | None, seed: int = 0, delta_scale: float = 0.002
) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """Yields the base model's tensors, or those of fine-tune number ``finetune``."""
    for spec in specs:
        values = _noise(spec, seed, 0.02)
        if spec.name.endswith("norm.weight"):
            values += 1.0  # RMSNorm scales start at one
        if finetune is not None:
            values += _noise(spec, seed * 1000 + finetune + 1, delta_scale)
        yield spec, values.to(spec.dtype)


def write_model(
    directory: str | Path,
    shape: LlamaShape,
    *,
    finetune: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: int = 10**9,
    overwrite: bool = False,
) -> Path:
    """Writes one example model (base, or a fine-tune) as a Hugging Face directory."""
    specs = llama_tensor_specs(shape, dtype)
    with atomic_directory(directory, overwrite=overwrite) as temp:
        with ShardedWriter(temp, specs, max_shard_size=max_shard_size) as writer:
            for spec, tensor in model_tensors(specs, finetune=finetune, seed=seed):
                writer.write(spec.name, tensor)
        write_config(temp, llama_config(shape, dtype))
    return Path(directory)


def write_trajectory(
    directory: str | Path,
    *,
    shape: LlamaShape = PRESETS["tiny"],
    steps: tuple[int, ...] = (100, 200, 300, 400, 500),
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> list[Path]:
    """Writes ``checkpoint-STEP/`` directories of a pretend training run (a random walk from the base)."""
    directory = Path(directory)
    specs = llama_tensor_specs(shape, dtype)
    paths = []
    for number, step in enumerate(steps, 1):
        path = directory / f"checkpoint-{step}"
        with atomic_directory(path, overwrite=overwrite) as temp:
            with ShardedWriter(temp, specs) as writer:
                for spec in specs:
                    walk = sum(_noise(spec, 10_000 + i, 0.002) for i in range(1, number + 1))
                    values = _noise(spec, 0, 0.02) + walk + (1.0 if spec.name.endswith("norm.weight") else 0.0)
                    writer.write(spec.name, values.to(dtype))
            write_config(temp, llama_config(shape, dtype))
            (temp / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
        paths.append(path)
    return paths


def write_example(
    directory: str | Path,
    *,
    shape: LlamaShape = PRESETS["tiny"],
    finetunes: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int = 400_000,
    overwrite: bool = False,
) -> list[Path]:
    """Writes ``base/`` and ``finetune-1/`` .. ``finetune-N/`` under ``directory``."""
    directory = Path(directory)
    paths = [write_model(directory / "base", shape, dtype=dtype, max_shard_size=max_shard_size,
                         overwrite=overwrite)]
    for n in range(1, finetunes + 1):
        paths.append(
            write_model(directory / f"finetune-{n}", shape, finetune=n, dtype=dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite)
        )
    return paths
