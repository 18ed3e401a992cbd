"""Which tensors are indexed by token: input embeddings, output heads and their biases."""

from __future__ import annotations

from collections.abc import Iterable

# Input embeddings, as transformers names them across families (a prefix may come before).
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight", "tok_embeddings.weight",
    "backbone.embeddings.weight", "shared.weight",
)
# Output heads (token-indexed rows) and their biases.
HEAD_SUFFIXES = (
    "lm_head.weight", "lm_head.bias", "embed_out.weight", "output_layer.weight", "lm_head.linear.weight",
    "lm_head.linear.bias", "cls.predictions.decoder.weight", "cls.predictions.bias", "vocab_projector.weight",
    "vocab_projector.bias", "lm_head.decoder.weight",
)
TOP_LEVEL_HEADS = ("output.weight",)


def is_vocabulary_tensor(name: str) -> bool:
    """Whether ``name`` is an embedding or head tensor (its first dimension the vocabulary)."""
    return name.endswith(EMBEDDING_SUFFIXES + HEAD_SUFFIXES) or name in TOP_LEVEL_HEADS


def embedding_name(names: Iterable[str]) -> str | None:
    """The input embedding among a checkpoint's tensor names (the vision tower's patch embedding is not one)."""
    found = [n for n in names if n.endswith(EMBEDDING_SUFFIXES) and "position" not in n]
    return min(found, key=len) if found else None
