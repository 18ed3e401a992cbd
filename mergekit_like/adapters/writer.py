"""Writing a LoRA adapter as PEFT saves one: ``adapter_config.json`` and ``adapter_model.safetensors``.

Names follow PEFT (see :mod:`mergekit_like.adapters.view`): ``base_model.model.<module>.lora_A.weight``
(r, in) and ``.lora_B.weight`` (out, r); ``.lora_embedding_A`` (r, tokens) and ``.lora_embedding_B``
(dim, r) for embeddings; a module saved whole (``modules_to_save``) as ``base_model.model.<tensor>``.
The directory appears atomically, complete or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_like.adapters.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig
from mergekit_like.adapters.view import EMBEDDING_A, EMBEDDING_B, LINEAR_A, LINEAR_B, PEFT_PREFIX
from mergekit_like.io.atomic import atomic_directory
from mergekit_like.io.checksums import write_manifest
from mergekit_like.io.reader import Checkpoint
from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.writer import ShardedWriter, write_text_durably

# PEFT reads an adapter from one file (it has no index for shards).
ONE_FILE = 2**62

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterContents:
    """An adapter to write: factors in memory, modules saved whole read from ``source`` as they are written."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B, A), as stored
    embeddings: frozenset[str]  # modules whose factors are PEFT's lora_embedding_B, lora_embedding_A
    saved: Mapping[str, Sequence[str]]  # module -> its tensors in ``source``
    source: Checkpoint
    all_modules: Sequence[str]  # every module of the model: what PEFT's name matching sees
    base_ref: str  # base_model_name_or_path, as the user named it
    causal_lm: bool  # task_type CAUSAL_LM: PeftModel.from_pretrained gives a PeftModelForCausalLM
    dtype: torch.dtype | None = None  # of the saved tensors; None: the source's
    fan_in_fan_out: bool = False  # some factors are of GPT-2's Conv1D layers (PEFT decides per layer)

    def factor_names(self, module: str) -> tuple[str, str]:
        """The adapter file's names of ``module``'s (B, A)."""
        b, a = (EMBEDDING_B, EMBEDDING_A) if module in self.embeddings else (LINEAR_B, LINEAR_A)
        return PEFT_PREFIX + module + b, PEFT_PREFIX + module + a

    def saved_dtype(self, name: str) -> torch.dtype:
        dtype = self.source.entry(name).dtype
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype


def adapter_config(contents: AdapterContents) -> AdapterConfig:
    """Scaling 1 for every module (alpha = rank), the most common rank as ``r``, the others as patterns."""
    ranks = {module: a.shape[0] for module, (_, a) in contents.factors.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank)) if counts else 1
    pattern = {pattern_key(m, contents.all_modules): rank for m, rank in ranks.items() if rank != r}
    raw = {"task_type": "CAUSAL_LM" if contents.causal_lm else None, "lora_dropout": 0.0}
    return AdapterConfig(
        r=r, lora_alpha=float(r), rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
        target_modules=target_modules(list(ranks), contents.all_modules),
        modules_to_save=modules_to_save(list(contents.saved), contents.all_modules),
        base_model=contents.base_ref, raw=raw, fan_in_fan_out=contents.fan_in_fan_out,
    )


def is_causal_lm(base: Path) -> bool:
    """Whether the base's config.json names a causal LM (PEFT's task_type then loads it as one)."""
    config = (base if base.is_dir() else base.parent) / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def target_modules(chosen: Sequence[str], all_modules: Sequence[str]) -> tuple[str, ...]:
    """PEFT's ``target_modules`` for exactly ``chosen``: PEFT takes a name or any module ending in ``.name``."""
    return _short_names(chosen, all_modules, lambda module, name: module == name or module.endswith("." + name))


def modules_to_save(chosen: Sequence[str], all_modules: Sequence[str]) -> tuple[str, ...]:
    """PEFT's ``modules_to_save`` for ``chosen``: PEFT takes any module whose name ends with the string."""
    return _short_names(chosen, all_modules, lambda module, name: module.endswith(name))


def _short_names(chosen: Sequence[str], all_modules: Sequence[str],
                 matches: Callable[[str, str], bool]) -> tuple[str, ...]:
    """A module type (``q_proj``) where it names exactly the chosen modules of the model, else the full names."""
    picked = set(chosen)
    by_type: dict[str, list[str]] = {}
    for module in chosen:
        by_type.setdefault(module.rpartition(".")[2], []).append(module)
    names: list[str] = []
    for kind, modules in by_type.items():
        exact = all(m in picked for m in all_modules if matches(m, kind))
        names += [kind] if exact else modules
    # "norm" (every module ending in norm, all chosen) makes "input_layernorm" redundant.
    return tuple(n for n in names if not any(other != n and matches(n, other) for other in names))


def pattern_key(module: str, all_modules: Sequence[str]) -> str:
    """A rank_pattern key for ``module`` alone: PEFT reads keys as regular expressions matching a dotted suffix.

    Escaped, so a dot is a dot; anchored at the start where another module's name ends with this one.
    """
    key = re.escape(module)
    return "^" + key if any(m != module and m.endswith("." + module) for m in all_modules) else key


def tensor_specs(contents: AdapterContents) -> list[TensorSpec]:
    specs = []
    for module, (b, a) in contents.factors.items():
        b_name, a_name = contents.factor_names(module)
        specs += [TensorSpec(a_name, a.dtype, tuple(a.shape)), TensorSpec(b_name, b.dtype, tuple(b.shape))]
    for names in contents.saved.values():
        specs += [TensorSpec(PEFT_PREFIX + n, contents.saved_dtype(n), contents.source.entry(n).shape)
                  for n in names]
    return specs


def write_adapter(output: str | Path, contents: AdapterContents, config: AdapterConfig, *,
                  files: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Writes the adapter (and ``files``: name -> text, such as the model card) into ``output``, atomically."""
    with atomic_directory(output, overwrite=overwrite) as temp:
        prefix = ADAPTER_WEIGHTS.removesuffix(".safetensors")
        with ShardedWriter(temp, tensor_specs(contents), max_shard_size=ONE_FILE, prefix=prefix) as writer:
            for module, (b, a) in contents.factors.items():
                b_name, a_name = contents.factor_names(module)
                writer.write(a_name, a)
                writer.write(b_name, b)
            for names in contents.saved.values():
                for name in names:  # read again here rather than held since the comparison
                    writer.write(PEFT_PREFIX + name, contents.source.read(name).to(contents.saved_dtype(name)))
        write_text_durably(temp / ADAPTER_CONFIG, config.to_json())
        for name, text in (files or {}).items():
            write_text_durably(temp / name, text)
        assert writer.result is not None
        write_manifest(temp, writer.result.digests)  # last: it covers every file above
    if (note := dataclasses.replace(writer.result, directory=Path(output)).nonfinite_note()) is not None:
        logger.warning("%s", note)
    return Path(output)
