"""LoRA adapters (PEFT's format): applied to their base while streaming, wherever a model is read."""

from mergekit_like.adapters.config import AdapterConfig, is_adapter_dir, read_adapter_config
from mergekit_like.adapters.models import open_model, split_adapter_ref
from mergekit_like.adapters.view import AdaptedCheckpoint, open_adapted

__all__ = ["AdaptedCheckpoint", "AdapterConfig", "is_adapter_dir", "open_adapted", "open_model", "read_adapter_config",
           "split_adapter_ref"]
