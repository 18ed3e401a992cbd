"""Reading a model's tokenizer and writing the output's, with the Hugging Face ``tokenizers`` library.

``tokenizer.json`` is the one format read: every fast tokenizer saves it, and the
``tokenizers`` library reads and writes it exactly as transformers does, without
transformers. A model with only a SentencePiece ``tokenizer.model`` (or GPT-2's
``vocab.json``/``merges.txt``) is refused with the one command that converts it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io.sidefiles import read_json_object

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SLOW_FORMATS = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
_CONVERT = ("save it as tokenizer.json: python -c \"from transformers import AutoTokenizer as T; "
            "T.from_pretrained('{dir}').save_pretrained('{dir}')\"")


@dataclass(frozen=True)
class AddedToken:
    """One added token of a tokenizer (``added_tokens`` of tokenizer.json), as it is stored."""

    id: int
    content: str
    fields: Mapping[str, Any]  # special, normalized, lstrip, rstrip, single_word

    def settings(self) -> dict[str, Any]:
        return {"content": self.content, **{k: v for k, v in self.fields.items() if k not in ("id", "content")}}


@dataclass(frozen=True)
class Vocabulary:
    """One model's tokens: text -> row, only the rows its embedding has (``size``)."""

    path: Path  # the tokenizer.json read
    tokens: Mapping[str, int]
    added: tuple[AddedToken, ...]  # in id order, each below ``size``
    size: int  # the rows of the model's embedding
    dropped: int = 0  # tokens of the tokenizer at rows the model does not have
    dropped_plain: int = 0  # of those, tokens of its model's own vocabulary (not added tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def token_at(self) -> dict[int, str]:
        return {i: t for t, i in self.tokens.items()}


def tokenizer_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` gives no tokenizer this tool reads, with the fix; None if it does."""
    if (directory / TOKENIZER_JSON).is_file():
        return None
    if not directory.is_dir():
        return f"'{directory}' does not exist (a tokenizer source is a model directory or Hub id)"
    slow = [name for name in SLOW_FORMATS if (directory / name).is_file()]
    if slow:
        return (f"'{directory}' has a tokenizer only as {slow[0]} (no tokenizer.json); "
                + _CONVERT.format(dir=directory))
    return (f"'{directory}' has no tokenizer (no tokenizer.json); copy the tokenizer of the model it was trained "
            "from into it, or leave the tokenizer section out of the recipe")


def read_tokenizer_json(directory: Path) -> dict[str, Any]:
    """The parsed tokenizer.json of ``directory`` (checked by :func:`tokenizer_dir_problem` first)."""
    path = directory / TOKENIZER_JSON
    data = read_json_object(path, "tokenizer", "replace it with the model's original tokenizer.json")
    if not isinstance(data.get("model"), dict):
        raise InvalidCheckpointError("not a tokenizer.json (no 'model' section)", path=path,
                                     fix="replace it with the model's original tokenizer.json")
    return data


def load_vocabulary(directory: Path, size: int | None) -> Vocabulary:
    """``directory``'s vocabulary, keeping the tokens below ``size`` rows (as mergekit drops the others)."""
    from tokenizers import Tokenizer

    path = directory / TOKENIZER_JSON
    data = read_tokenizer_json(directory)
    try:
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # the Rust library raises plain Exceptions for any malformed field
        raise InvalidCheckpointError(f"the tokenizer cannot be loaded ({str(exc)[:120]})", path=path,
                                     fix="replace it with the model's original tokenizer.json") from None
    every = tokenizer.get_vocab(with_added_tokens=True)
    size = len(every) if size is None else size
    tokens = {t: i for t, i in sorted(every.items(), key=lambda item: item[1]) if i < size}
    every_added = [_added(entry) for entry in data.get("added_tokens") or []]
    added = tuple(sorted((a for a in every_added if a.id < size), key=lambda a: a.id))
    added_beyond = sum(1 for a in every_added if a.id >= size)
    dropped = len(every) - len(tokens)
    return Vocabulary(path, tokens, added, size, dropped, dropped - added_beyond)


def _added(entry: Mapping[str, Any]) -> AddedToken:
    return AddedToken(int(entry["id"]), str(entry["content"]), dict(entry))


def stripped(data: dict[str, Any], vocabulary: Vocabulary) -> dict[str, Any]:
    """tokenizer.json without the tokens at rows the model lacks (BPE only, as mergekit strips a base)."""
    if not vocabulary.dropped:
        return data
    model = data["model"]
    if model.get("type") != "BPE":
        raise InvalidCheckpointError(
            f"the tokenizer has {vocabulary.dropped} tokens beyond the model's vocabulary size {vocabulary.size}, "
            f"and only a BPE tokenizer can be cut to it (this one is {model.get('type')})", path=vocabulary.path,
            fix="set vocab_size in config.json to the tokenizer's size, or use another model's tokenizer")
    out = copy.deepcopy(data)
    unused = {t for t, i in out["model"]["vocab"].items() if i >= vocabulary.size}
    unused |= {e["content"] for e in out.get("added_tokens") or [] if e["id"] >= vocabulary.size}
    out["added_tokens"] = [e for e in out.get("added_tokens") or [] if e["id"] < vocabulary.size]
    out["model"]["vocab"] = {t: i for t, i in out["model"]["vocab"].items() if t not in unused}
    out["model"]["merges"] = [m for m in out["model"].get("merges") or []
                              if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    return out


def build_output_tokenizer(
    source: dict[str, Any], plain_tokens: Sequence[str], added: Sequence[AddedToken],
) -> Any:
    """``source`` (tokenizer.json data) with ``plain_tokens`` added as plain tokens, then ``added`` as they were.

    The ``tokenizers`` library gives each new token the next id, as transformers'
    ``add_tokens`` (which calls it) does in mergekit.
    """
    from tokenizers import AddedToken as LibraryToken
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(source))
    present = set(tokenizer.get_vocab(with_added_tokens=True))
    for token in plain_tokens:
        if token not in present:
            tokenizer.add_tokens([token])
            present.add(token)
    for entry in added:
        if entry.content not in present:
            flags = {k: entry.fields[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                     if k in entry.fields}
            tokenizer.add_tokens([LibraryToken(entry.content, **flags)])
            present.add(entry.content)
    return tokenizer


def output_vocabulary(tokenizer: Any) -> dict[str, int]:
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def read_tokenizer_config(directory: Path) -> dict[str, Any] | None:
    """``directory``'s tokenizer_config.json (None: it has none); one that cannot be read is an error."""
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    return read_json_object(path, "tokenizer config", "replace it with the model's original tokenizer_config.json")


def tokenizer_config_text(source_dir: Path, tokenizer: Any, chat_template: str | None) -> str:
    """The output's tokenizer_config.json: the source's, its added tokens those of ``tokenizer``."""
    config = read_tokenizer_config(source_dir) or {}
    data = json.loads(tokenizer.to_str())
    config["added_tokens_decoder"] = {
        str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in data.get("added_tokens") or []}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if chat_template is not None:
        config.pop("chat_template", None)  # written beside it, as transformers writes it
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def chat_template_of(directory: Path) -> str | None:
    """A model's chat template: chat_template.jinja, else tokenizer_config.json's (a string)."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = (read_tokenizer_config(directory) or {}).get("chat_template")
    return template if isinstance(template, str) else None
