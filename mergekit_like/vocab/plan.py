"""Planning the output vocabulary of a merge: its tokenizer files, config and every model's rows.

Everything here is decided from the tokenizers and configs before any tensor is
read; every problem (a model without a tokenizer, a tokenizer that does not match
its embedding, a ``tokens:`` entry that cannot be honoured) is reported at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_like.errors import InvalidCheckpointError, RecipeError
from mergekit_like.vocab.alignment import Alignment, align, rule_problems
from mergekit_like.vocab.chat_templates import resolve_chat_template
from mergekit_like.vocab.spec import VOCABULARY_SOURCES, TokenizerSpec
from mergekit_like.vocab.tokenizers_io import (
    CHAT_TEMPLATE_FILE,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    Vocabulary,
    build_output_tokenizer,
    chat_template_of,
    load_vocabulary,
    output_vocabulary,
    read_tokenizer_config,
    read_tokenizer_json,
    stripped,
    tokenizer_config_text,
    tokenizer_dir_problem,
)

logger = logging.getLogger(__name__)

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "unk_token_id")
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class VocabularyPlan:
    """The output vocabulary and how each model's embedding and head rows map onto it."""

    spec: TokenizerSpec
    tokens: Mapping[str, int]
    rows: int
    vocabularies: Mapping[str, Vocabulary]  # every model read, by reference
    base: str | None  # the base model (its row is a missing token's default)
    files: Mapping[str, str] = field(default_factory=dict)  # the output's tokenizer files: name -> text
    reference_tokens: Mapping[int, str] = field(default_factory=dict)  # the config model's id -> token
    _alignments: dict[tuple[str, ...], Alignment] = field(default_factory=dict, compare=False, repr=False)

    def tensor_problems(self, name: str, models: tuple[str, ...]) -> list[str]:
        """Why tensor ``name``, read from ``models``, cannot be aligned (each ``tokens:`` source must be
        among them); aligns it, and warns of rows that come out zero because none of them has the token."""
        problems = []
        for token, rule in self.spec.tokens.items():
            source = getattr(rule.source, "model", None)
            if source is not None and source not in models:
                problems.append(f"tensor '{name}': tokenizer.tokens[{token!r}] takes its row from '{source}', which "
                                f"this tensor is not merged from ({', '.join(models)}); name one of those")
        if problems:
            return problems
        zero = [row for row, d in self.alignment(models).defaults.items() if not d.parts and d.why.startswith("in no")]
        if zero:
            at = {i: t for t, i in self.tokens.items()}
            logger.warning("tensor '%s': %d tokens are in none of the models it is merged from (e.g. %s); their rows "
                           "are zeros", name, len(zero), ", ".join(repr(at[r]) for r in zero[:3]))
        return []

    def alignment(self, models: tuple[str, ...]) -> Alignment:
        """The rows of ``models`` (a tensor's models, in the order their rows average)."""
        if models not in self._alignments:
            present = self.base if self.base in models else None
            self._alignments[models] = align(self.tokens, self.rows, {m: self.vocabularies[m] for m in models},
                                             present, self.spec.tokens)
        return self._alignments[models]

    def config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The output's config: ``vocab_size`` its rows, token ids those of the output vocabulary."""
        out = self._renumbered(config)
        text = out.get("text_config")
        if "vocab_size" not in out and isinstance(text, Mapping) and "vocab_size" in text:
            out["text_config"] = {**self._renumbered(text), "vocab_size": self.rows}
        else:
            out["vocab_size"] = self.rows
        return out

    def generation_config(self, directory: Path) -> str | None:
        """The reference's generation_config.json, its token ids renumbered, when they move."""
        path = directory / GENERATION_CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        renumbered = self._renumbered(data)
        return None if renumbered == data else json.dumps(renumbered, indent=2) + "\n"

    def _renumbered(self, config: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for key in TOKEN_ID_KEYS:
            value = out.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = self._token_id(value)
            elif isinstance(value, list) and all(isinstance(v, int) for v in value):
                out[key] = [self._token_id(v) for v in value]
        return out

    def _token_id(self, old: int) -> int:
        token = self.reference_tokens.get(old)
        return self.tokens.get(token, old) if token is not None else old

    def summary(self, models: Sequence[str]) -> dict[str, Any]:
        """The vocabulary plan for --dry-run: sizes, tokens added per model, rows taken from where."""
        base_tokens = self.vocabularies[self.base or models[0]].tokens
        added = {m: sum(1 for t in self.vocabularies[m].tokens if t not in base_tokens) for m in models}
        return {"source": self.spec.source, "tokens_added_by_model": added,
                **self.alignment(tuple(models)).summary()}


def plan_vocabulary(
    spec: TokenizerSpec, chat_template: str | None, models: Sequence[str], base: str | None,
    directories: Mapping[str, Path], sizes: Mapping[str, int | None],
) -> VocabularyPlan:
    """The output vocabulary of a merge of ``models`` (every model read, base included).

    ``directories``: each model's (and each model the spec names') directory; ``sizes``: the
    vocabulary size of each (config's vocab_size, else its embedding's rows).
    """
    first = base if base is not None else models[0]
    problems = []
    needed = list(dict.fromkeys([first, *models, *spec.models()]))
    for ref in needed:
        if ref not in directories:
            problems.append(f"tokenizer: '{ref}' is not among the models merged; name one of them")
        elif problem := tokenizer_dir_problem(directories[ref]):
            problems.append(f"tokenizer: {problem}")
    if problems:
        raise RecipeError(problems)
    vocabularies = {ref: load_vocabulary(directories[ref], sizes.get(ref)) for ref in needed}
    tokenizer, source_dir = _output_tokenizer(spec, first, [m for m in needed if m in models], vocabularies,
                                              directories)
    tokens = output_vocabulary(tokenizer)
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise InvalidCheckpointError("the output vocabulary's token ids have gaps", path=source_dir / TOKENIZER_JSON,
                                     fix="use a tokenizer whose ids run from 0 without gaps")
    pad = spec.pad_to_multiple_of
    rows = math.ceil(len(tokens) / pad) * pad if pad else len(tokens)
    problems = rule_problems(tokens, {m: vocabularies[m] for m in models}, spec)
    if problems:
        raise RecipeError(problems)
    template = None
    if chat_template is not None:
        template = resolve_chat_template(chat_template, [chat_template_of(directories[m]) for m in models])
    files = {TOKENIZER_JSON: tokenizer.to_str(pretty=True) + "\n",
             TOKENIZER_CONFIG: tokenizer_config_text(source_dir, tokenizer, template)}
    if (source_dir / SPECIAL_TOKENS_MAP).is_file():
        files[SPECIAL_TOKENS_MAP] = (source_dir / SPECIAL_TOKENS_MAP).read_text(encoding="utf-8")
    if template is not None:
        files[CHAT_TEMPLATE_FILE] = template
    elif (existing := chat_template_of(source_dir)) is not None and (source_dir / CHAT_TEMPLATE_FILE).is_file():
        files[CHAT_TEMPLATE_FILE] = existing
    return VocabularyPlan(spec, tokens, rows, vocabularies, base, files, vocabularies[first].token_at())


def chat_template_files(value: str, models: Sequence[Path], source_dir: Path) -> dict[str, str]:
    """The files that give a copied tokenizer the recipe's chat template (a recipe without a tokenizer
    section): the template, and the source's tokenizer config without a template of its own."""
    template = resolve_chat_template(value, [chat_template_of(d) for d in models])
    if template is None:
        return {}
    config = read_tokenizer_config(source_dir)
    if config is None:
        raise RecipeError([f"chat_template: '{source_dir}' has no tokenizer_config.json to give the template to; "
                           "add a tokenizer section (tokenizer: {source: base}) or copy the tokenizer in"])
    config.pop("chat_template", None)
    return {TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n", CHAT_TEMPLATE_FILE: template}


def _output_tokenizer(
    spec: TokenizerSpec, first: str, models: Sequence[str], vocabularies: Mapping[str, Vocabulary],
    directories: Mapping[str, Path],
) -> tuple[Any, Path]:
    """The output's tokenizer (a ``tokenizers.Tokenizer``) and the directory whose config it keeps.

    As mergekit builds it: the base's (cut to its rows) for ``base`` and ``union``, the named
    model's as it is otherwise; ``union`` then adds every other model's tokens the base lacks,
    in model order, the plain ones first, then the added ones with their settings; last, the
    tokens of ``tokens:`` that are still missing.
    """
    extra = list(spec.tokens)
    if spec.source not in VOCABULARY_SOURCES:
        source_dir = directories[spec.source]
        return build_output_tokenizer(read_tokenizer_json(source_dir), extra, ()), source_dir
    source_dir = directories[first]
    base_data = stripped(read_tokenizer_json(source_dir), vocabularies[first])
    if spec.source == "base":
        return build_output_tokenizer(base_data, extra, ()), source_dir
    base_tokens = vocabularies[first].tokens
    added: dict[str, Any] = {}
    for ref in [first, *[m for m in models if m != first]]:
        for token in vocabularies[ref].added:
            added.setdefault(token.content, token)
    plain = []
    for ref in [m for m in models if m != first]:
        own_added = {t.content for t in vocabularies[ref].added}
        plain += [t for t in vocabularies[ref].tokens if t not in own_added and t not in base_tokens
                  and t not in added]
    plain = list(dict.fromkeys(plain))
    tokenizer = build_output_tokenizer(base_data, plain, [a for a in added.values() if a.content not in base_tokens])
    return build_output_tokenizer(json.loads(tokenizer.to_str()), extra, ()), source_dir
