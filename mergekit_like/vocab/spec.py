"""mergekit's ``tokenizer:`` section (and the older ``tokenizer_source:``), as written in a recipe.

``source`` says which vocabulary the output has: ``union`` (every model's tokens, the
base's first, in its order), ``base`` (the base model's), or a model's. ``tokens``
says, per token, whose embedding row the token gets; ``force`` gives it that row in
every model even where the model has the token itself. ``pad_to_multiple_of`` pads the
rows to a multiple (the padding rows are each model's mean row).

Only the structure lives here; the alignment of rows is decided from the tokenizers
(:mod:`mergekit_like.vocab.alignment`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekit_like.errors import short_repr, short_text

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
VOCABULARY_SOURCES = ("union", "base")


@dataclass(frozen=True)
class ZeroRow:
    """A token whose embedding is all zeros (``{kind: zero}``)."""


@dataclass(frozen=True)
class ModelRow:
    """A token whose embedding is ``model``'s row for it (a model reference as the source)."""

    model: str


@dataclass(frozen=True)
class ModelTokenRow:
    """A token whose embedding is ``model``'s row of another token (``{kind: model_token}``)."""

    model: str
    token: str | None = None
    token_id: int | None = None


RowSource = ZeroRow | ModelRow | ModelTokenRow


@dataclass(frozen=True)
class TokenRule:
    """What one token of ``tokens:`` gets: its row's source (None: as by default) and ``force``."""

    source: RowSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary a recipe asks for."""

    source: str = "union"  # "union", "base" or a model reference
    tokens: Mapping[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    # Whether it came as the older top-level ``tokenizer_source:`` key (written back the same way).
    legacy: bool = False

    def models(self) -> list[str]:
        """Every model the spec names, besides the recipe's own."""
        named = [] if self.source in VOCABULARY_SOURCES else [self.source]
        for rule in self.tokens.values():
            if isinstance(rule.source, (ModelRow, ModelTokenRow)):
                named.append(rule.source.model)
        return list(dict.fromkeys(named))

    def renamed(self, rename: Any) -> TokenizerSpec:
        """This spec with model references passed through ``rename`` ("base" and "union" kept)."""
        def rule(r: TokenRule) -> TokenRule:
            source = r.source
            if isinstance(source, ModelRow):
                source = ModelRow(rename(source.model))
            elif isinstance(source, ModelTokenRow):
                source = ModelTokenRow(rename(source.model), source.token, source.token_id)
            return TokenRule(source, r.force)

        source = self.source if self.source in VOCABULARY_SOURCES else rename(self.source)
        return TokenizerSpec(source, {t: rule(r) for t, r in self.tokens.items()}, self.pad_to_multiple_of,
                             self.legacy)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source}
        if self.tokens:
            data["tokens"] = {token: _rule_to_dict(rule) for token, rule in self.tokens.items()}
        if self.pad_to_multiple_of is not None:
            data["pad_to_multiple_of"] = self.pad_to_multiple_of
        return data


def _rule_to_dict(rule: TokenRule) -> dict[str, Any]:
    data: dict[str, Any] = {}
    source = rule.source
    if isinstance(source, ZeroRow):
        data["source"] = {"kind": "zero"}
    elif isinstance(source, ModelRow):
        data["source"] = source.model
    elif isinstance(source, ModelTokenRow):
        data["source"] = {"kind": "model_token", "model": source.model,
                          **({"token": source.token} if source.token is not None else {"token_id": source.token_id})}
    if rule.force:
        data["force"] = True
    return data


def parse_tokenizer(data: Any, problems: list[str]) -> TokenizerSpec | None:
    """The ``tokenizer:`` section, every problem appended to ``problems``."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        problems.append(f"tokenizer must be a mapping (source, tokens, pad_to_multiple_of), not {short_repr(data)}")
        return None
    for key in data:
        if key not in TOKENIZER_KEYS:
            problems.append(f"tokenizer: unknown key {short_repr(key)} (known: {', '.join(sorted(TOKENIZER_KEYS))})")
    source = parse_source(data.get("source", "union"), "tokenizer.source", problems)
    pad = data.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        problems.append(f"tokenizer.pad_to_multiple_of must be a positive integer, not {short_repr(pad)}")
        pad = None
    tokens = data.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        problems.append(f"tokenizer.tokens must be a mapping of token: settings, not {short_repr(tokens)}")
        tokens = {}
    rules = {}
    for token, rule in tokens.items():
        if not isinstance(token, str) or not token:
            problems.append(f"tokenizer.tokens: {short_repr(token)} is not a token (write the token's text)")
            continue
        rules[token] = _parse_rule(token, rule, problems)
    return TokenizerSpec(source or "union", rules, pad)


def parse_source(value: Any, where: str, problems: list[str]) -> str | None:
    """A vocabulary source: "union", "base" or a model reference."""
    if isinstance(value, str) and value.strip():
        return value
    problems.append(f"{where} must be union, base or a model path, not {short_repr(value)}")
    return None


def _parse_rule(token: str, data: Any, problems: list[str]) -> TokenRule:
    where = f"tokenizer.tokens[{short_text(token)!r}]"
    if data is None:
        return TokenRule()
    if not isinstance(data, Mapping):
        problems.append(f"{where} must be a mapping (source, force), not {short_repr(data)}")
        return TokenRule()
    for key in data:
        if key not in TOKEN_KEYS:
            problems.append(f"{where}: unknown key {short_repr(key)} (known: force, source)")
    force = data.get("force", False)
    if not isinstance(force, bool):
        problems.append(f"{where}.force must be true or false, not {short_repr(force)}")
        force = False
    return TokenRule(_parse_row_source(data.get("source"), where, problems), force)


def _parse_row_source(data: Any, where: str, problems: list[str]) -> RowSource | None:
    if data is None:
        return None
    if isinstance(data, str):
        return ModelRow(data)
    if isinstance(data, Mapping) and isinstance(data.get("model"), str) and "kind" not in data:
        return ModelRow(data["model"])  # mergekit's model reference in mapping form
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == "zero":
        if set(data) - {"kind"}:
            problems.append(f"{where}.source: kind zero takes no other keys")
        return ZeroRow()
    if kind == "model_token":
        return _parse_model_token(data, where, problems)
    problems.append(f"{where}.source must be a model, {{kind: zero}} or {{kind: model_token, model, token}}, "
                    f"not {short_repr(data)}")
    return None


def _parse_model_token(data: Mapping[str, Any], where: str, problems: list[str]) -> RowSource | None:
    unknown = set(data) - {"kind", "model", "token", "token_id"}
    if unknown:
        problems.append(f"{where}.source: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                        "(known: kind, model, token, token_id)")
    model, token, token_id = data.get("model"), data.get("token"), data.get("token_id")
    if not isinstance(model, str):
        problems.append(f"{where}.source: model_token needs a model, not {short_repr(model)}")
        return None
    if (token is None) == (token_id is None):
        problems.append(f"{where}.source: model_token needs one of token or token_id")
        return None
    if token is not None and not isinstance(token, str):
        problems.append(f"{where}.source.token must be a token's text, not {short_repr(token)}")
        return None
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        problems.append(f"{where}.source.token_id must be a non-negative integer, not {short_repr(token_id)}")
        return None
    return ModelTokenRow(model, token, token_id)
