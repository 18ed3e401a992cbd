"""A PEFT LoRA adapter's ``adapter_config.json``: what this tool reads and writes of it.

Only what changes the weights is read: the rank and alpha (and their per-module
patterns), rsLoRA scaling, ``fan_in_fan_out`` (GPT-2's Conv1D layers store the
transpose), ``modules_to_save``, DoRA and the base model. Anything that would
change the weights in a way this tool does not apply is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_like.errors import InvalidCheckpointError, short_repr
from mergekit_like.io.layout import ADAPTER_CONFIG
from mergekit_like.io.layout import ADAPTER_WEIGHTS as ADAPTER_WEIGHTS  # re-exported: the adapter package names it
from mergekit_like.io.sidefiles import read_json_object

ADAPTER_PICKLE = "adapter_model.bin"
# Keys of adapter_config.json that, set, change the weights in ways not applied here.
UNSUPPORTED = {
    "lora_bias": "a LoRA bias (lora_bias: true)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "block-diagonal LoRA",
}


@dataclass(frozen=True)
class AdapterConfig:
    """The weight-changing settings of a LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    target_modules: tuple[str, ...] | str = ()
    base_model: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)  # the file as read (written back as it was)

    def rank(self, module: str) -> int:
        return int(self.rank_pattern[key]) if (key := _pattern_key(self.rank_pattern, module)) else self.r

    def alpha(self, module: str) -> float:
        return float(self.alpha_pattern[key]) if (key := _pattern_key(self.alpha_pattern, module)) else self.lora_alpha

    def scaling(self, module: str, rank: int) -> float:
        """The factor of ``B @ A`` for ``module`` (of ``rank``, read from its tensors), as PEFT computes it."""
        alpha = self.alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_json(self) -> str:
        data: dict[str, Any] = {
            **self.raw, "peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": self.fan_in_fan_out, "modules_to_save": list(self.modules_to_save) or None,
            "use_dora": self.use_dora, "base_model_name_or_path": self.base_model,
            "target_modules": (self.target_modules if isinstance(self.target_modules, str)
                               else sorted(self.target_modules)),
        }
        data.setdefault("bias", "none")
        data.setdefault("inference_mode", True)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rule: the first pattern that matches the module's name, or a suffix of it at a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: Path) -> AdapterConfig:
    """``directory``'s adapter_config.json, refused with one line for anything not applied as PEFT applies it."""
    path = directory / ADAPTER_CONFIG
    data = read_json_object(path, "adapter config", "replace it with the adapter's original adapter_config.json")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidCheckpointError(f"peft_type {short_repr(peft_type)} is not supported (only LORA adapters are)",
                                     path=path, fix="merge it into its base with peft's merge_and_unload() first")
    for key, what in UNSUPPORTED.items():
        if data.get(key) not in (None, False, [], {}, 0):
            raise InvalidCheckpointError(f"the adapter uses {what}, which this tool does not apply", path=path,
                                         fix="merge it into its base with peft's merge_and_unload() first")
    problems = _number_problems(data)
    if problems:
        raise InvalidCheckpointError("; ".join(problems), path=path, fix="correct adapter_config.json")
    return AdapterConfig(
        r=int(data["r"]), lora_alpha=float(data.get("lora_alpha", 8)),
        use_rslora=bool(data.get("use_rslora", False)), rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern=dict(data.get("alpha_pattern") or {}), fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
        modules_to_save=tuple(data.get("modules_to_save") or ()), use_dora=bool(data.get("use_dora", False)),
        target_modules=_targets(data.get("target_modules")), base_model=data.get("base_model_name_or_path"), raw=data,
    )


def _number_problems(data: Mapping[str, Any]) -> list[str]:
    problems = []
    r = data.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, not {short_repr(r)}")
    alpha = data.get("lora_alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a number, not {short_repr(alpha)}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(data.get(key) or {}, Mapping):
            problems.append(f"{key} must be a mapping of module pattern: value")
    return problems


def _targets(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str):
        return value
    return tuple(str(v) for v in value) if isinstance(value, Sequence) else ()
