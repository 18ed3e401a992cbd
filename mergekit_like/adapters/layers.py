"""Which weights a model stores transposed: GPT-2's ``Conv1D`` layers, PEFT's ``fan_in_fan_out``.

transformers builds the projections of GPT-2 and the models made of its blocks as
``Conv1D``, whose weight is (in, out) where a Linear's is (out, in). PEFT decides by the
layer, not by the adapter config: it turns ``fan_in_fan_out`` on for a Conv1D layer and
off for a Linear one whatever the config says (with a warning). This tool decides the
same way, from the model's ``config.json``; a checkpoint without one is taken at the
adapter config's word.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# transformers model types whose blocks are GPT-2's (Conv1D projections).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# The Conv1D modules of those blocks (their heads and embeddings are Linear and Embedding).
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def is_conv1d(config: Mapping[str, Any] | None, module: str) -> bool | None:
    """Whether transformers builds ``module`` as a Conv1D; None where ``config`` names no model type."""
    model_type = config.get("model_type") if config is not None else None
    if not isinstance(model_type, str):
        return None
    return model_type in CONV1D_MODEL_TYPES and module.rpartition(".")[2] in CONV1D_MODULES


def stores_transposed(config: Mapping[str, Any] | None, module: str, fan_in_fan_out: bool) -> bool:
    """Whether ``module``'s weight is (in, out): the layer's kind where known, else ``fan_in_fan_out``."""
    layer = is_conv1d(config, module)
    return fan_in_fan_out if layer is None else layer
