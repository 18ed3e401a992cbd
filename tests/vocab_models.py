"""Tiny models with their own tokenizers (built with ``tokenizers``), for vocabulary tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from helpers import write_checkpoint

HIDDEN = 4


def write_tokenizer(directory: Path, tokens: Sequence[str], added: Sequence[tuple[str, bool]] = ()) -> None:
    """A word-level tokenizer: ``tokens`` at ids 0.., then ``added`` (text, special) after them."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tokenizer.pre_tokenizer = Whitespace()
    for text, special in added:
        tokenizer.add_tokens([AddedToken(text, special=special, normalized=not special)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": tokens[0], "model_max_length": 64}))


def write_model(
    directory: Path, tokens: Sequence[str], *, seed: int, added: Sequence[tuple[str, bool]] = (),
    head: bool = True, tied: bool = False, rows: int | None = None, dtype: torch.dtype = torch.float32,
    config: dict | None = None, hidden: int = HIDDEN, layers: int = 0,
) -> dict[str, torch.Tensor]:
    """A two-tensor "model" (embedding, norm, optional head) whose embedding row i is token i's."""
    count = rows if rows is not None else len(tokens) + len(added)
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(count, hidden, generator=g).to(dtype),
               "model.norm.weight": torch.randn(hidden, generator=g).to(dtype)}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(hidden, hidden, generator=g).to(dtype)
    if head:
        tensors["lm_head.weight"] = torch.randn(count, hidden, generator=g).to(dtype)
    write_checkpoint(directory, tensors, config={"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                 "vocab_size": count, "tie_word_embeddings": tied,
                                                 "bos_token_id": 1, "num_hidden_layers": layers,
                                                 **(config or {})})
    write_tokenizer(directory, tokens, added)
    return tensors
