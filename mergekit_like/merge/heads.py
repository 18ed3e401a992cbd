"""Tied embeddings: output heads that some models store and others tie to their input embedding.

A model with ``tie_word_embeddings`` (GPT-2, Gemma, small Qwen) usually stores only
its embedding; a fine-tune of it may also store the head (some trainers save both
names), and an untied model stores both. As mergekit: the output has the head when
any model stores it, and a model without it gives its embedding in its place. The
output's ``config.json`` then says the head is untied, so the head written is the head
a loader uses (mergekit keeps the base's flag, which can tie a written head away).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# (head, the embedding it is tied to), as transformers names them for each family.
TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "wte.weight"),
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),
    ("lm_head.weight", "backbone.embeddings.weight"),
    ("output.weight", "model.tok_embeddings.weight"),
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),
    ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
)
TIE_KEY = "tie_word_embeddings"


@dataclass(frozen=True)
class TiedHead:
    """A head that some models read from their embedding (``tied``: those models)."""

    head: str
    embedding: str
    tied: tuple[str, ...]  # models without the head: their embedding is read in its place


# Families whose config ties the head unless it says otherwise (transformers' defaults).
TIED_BY_DEFAULT = {"gpt2", "gemma", "gemma2", "gemma3", "gemma3_text", "t5", "bert", "roberta", "distilbert"}


def find_tied_head(names: Mapping[str, set[str]], configs: Mapping[str, Mapping[str, Any] | None]) -> TiedHead | None:
    """The head some models store and others tie away (their config says so), reading their embedding.

    A model without the head whose config says it is untied is incomplete, not tied: it is
    left to the names check, which refuses it.
    """
    for head, embedding in TIED_PAIRS:
        holders = [ref for ref, found in names.items() if head in found]
        if not holders or len(holders) == len(names):
            continue
        tied = tuple(ref for ref in names if head not in names[ref])
        if all(embedding in names[ref] and ties(configs.get(ref)) for ref in tied):
            return TiedHead(head, embedding, tied)
    return None


def ties(config: Mapping[str, Any] | None) -> bool:
    """Whether a model's config ties its head to its embedding (no config: assumed, as its tensors say)."""
    if config is None:
        return True
    value = tying_value(config)
    return value if value is not None else config.get("model_type") in TIED_BY_DEFAULT


def tying_value(config: Mapping[str, Any]) -> bool | None:
    """The ``tie_word_embeddings`` a config states (top level, else its text_config), or None."""
    text = config.get("text_config")
    for scope in (config, text if isinstance(text, Mapping) else {}):
        if isinstance(scope.get(TIE_KEY), bool):
            return bool(scope[TIE_KEY])
    return None


def written_head(names: set[str]) -> str | None:
    """The tied-pair head among an output's tensor names, if its embedding is there too."""
    for head, embedding in TIED_PAIRS:
        if head in names and embedding in names:
            return head
    return None


def config_with_tying(config: Mapping[str, Any], head_written: bool) -> dict[str, Any]:
    """``config`` with ``tie_word_embeddings`` saying what the tensors written do (a Llama config
    without the key means untied, so an output without a head says so explicitly)."""
    out = dict(config)
    text = out.get("text_config")
    if isinstance(text, Mapping) and TIE_KEY in text and TIE_KEY not in out:
        out["text_config"] = {**text, TIE_KEY: not head_written}
    else:
        out[TIE_KEY] = not head_written
    return out
