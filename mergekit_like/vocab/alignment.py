"""Which row of each model every output token gets: embeddings and heads aligned by token, not by row.

Decided from the tokenizers alone, before any tensor is read, as mergekit 0.1.5
decides it: a model that has the token gives its own row; for a token some model
lacks (or a ``force``d one) every model gets one default row, which is, unless the
recipe's ``tokens:`` says otherwise:

* the row of the one model that has it, when only one has it;
* the base model's row, when the base has it;
* the mean of the rows of the models that have it;
* zeros, when no model has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mergekit_like.errors import short_text
from mergekit_like.vocab.spec import ModelRow, ModelTokenRow, TokenizerSpec, TokenRule, ZeroRow
from mergekit_like.vocab.tokenizers_io import Vocabulary


@dataclass(frozen=True)
class DefaultRow:
    """A token's row in every model that does not give its own: the mean of ``parts`` (model, row).

    One part is that row; none is zeros.
    """

    parts: tuple[tuple[str, int], ...]
    why: str  # for the plan: "only in X", "from the base", "mean of 2 models", "zero", ...


@dataclass(frozen=True)
class Alignment:
    """The output vocabulary and, per model, the row each output row is taken from."""

    tokens: Mapping[str, int]  # output token -> row
    rows: int  # the output's rows: the tokens, padded to ``pad_to_multiple_of``
    sources: Mapping[str, tuple[int, ...]]  # model -> its row for each output token, -1 where it lacks it
    defaults: Mapping[int, DefaultRow] = field(default_factory=dict)  # output row -> its default
    forced: frozenset[int] = frozenset()  # rows every model takes from the default

    @property
    def padding(self) -> int:
        return self.rows - len(self.tokens)

    def summary(self) -> dict[str, object]:
        """What --dry-run shows: the sizes and where the rows come from."""
        models = {}
        for model, source in self.sources.items():
            present = [s for s in source if s >= 0]
            moved = sum(1 for i, s in enumerate(source) if s >= 0 and s != i)
            models[model] = {"own_rows": len(present), "moved": moved, "filled": len(source) - len(present)}
        reasons: dict[str, int] = {}
        for default in self.defaults.values():
            reasons[default.why] = reasons.get(default.why, 0) + 1
        return {"tokens": len(self.tokens), "rows": self.rows, "padding_rows": self.padding,
                "models": models, "default_rows": reasons, "forced": len(self.forced)}


def align(
    tokens: Mapping[str, int], rows: int, vocabularies: Mapping[str, Vocabulary], base: str | None,
    rules: Mapping[str, TokenRule],
) -> Alignment:
    """Every model's row for each of ``tokens`` and the default rows (see the module's rules).

    ``vocabularies``: the models whose tensors are aligned, in the order their rows are averaged.
    """
    models = list(vocabularies)
    sources = {m: tuple(vocabularies[m].tokens.get(token, -1) for token in tokens) for m in models}
    defaults: dict[int, DefaultRow] = {}
    forced = set()
    for token, row in tokens.items():
        rule = rules.get(token)
        present = [m for m in models if sources[m][row] >= 0]
        force = rule is not None and rule.force
        if force:
            forced.add(row)
        if len(present) == len(models) and not force:
            continue
        if rule is not None and rule.source is not None:
            defaults[row] = _ruled(token, rule, vocabularies, sources, row)
        else:
            defaults[row] = _default(present, base, sources, row)
    return Alignment(dict(tokens), rows, sources, defaults, frozenset(forced))


def _default(present: Sequence[str], base: str | None, sources: Mapping[str, tuple[int, ...]], row: int) -> DefaultRow:
    if len(present) == 1:
        return DefaultRow(((present[0], sources[present[0]][row]),), f"only in {present[0]}")
    if not present:
        return DefaultRow((), "in no model: zero")
    if base is not None and base in present:
        return DefaultRow(((base, sources[base][row]),), "from the base")
    return DefaultRow(tuple((m, sources[m][row]) for m in present), f"mean of {len(present)} models")


def _ruled(token: str, rule: TokenRule, vocabularies: Mapping[str, Vocabulary],
           sources: Mapping[str, tuple[int, ...]], row: int) -> DefaultRow:
    source = rule.source
    if isinstance(source, ZeroRow):
        return DefaultRow((), "zero (tokens:)")
    if isinstance(source, ModelRow):
        return DefaultRow(((source.model, sources[source.model][row]),), f"from {source.model} (tokens:)")
    assert isinstance(source, ModelTokenRow)
    vocabulary = vocabularies[source.model]
    index = source.token_id if source.token_id is not None else vocabulary.tokens[str(source.token)]
    return DefaultRow(((source.model, index),), f"{source.model}'s row of another token (tokens:)")


def rule_problems(
    tokens: Mapping[str, int], vocabularies: Mapping[str, Vocabulary], spec: TokenizerSpec,
) -> list[str]:
    """Every ``tokens:`` entry that cannot be honoured, one line each (before any tensor is read)."""
    problems = []
    for token, rule in spec.tokens.items():
        where = f"tokenizer.tokens[{short_text(token)!r}]"
        source = rule.source
        holders = [m for m, v in vocabularies.items() if token in v.tokens]
        if source is None and not holders:
            problems.append(f"{where}: no model has this token; give it a source ({{kind: zero}}, a model's token "
                            "with {kind: model_token, model, token}) or remove it")
            continue
        if isinstance(source, (ModelRow, ModelTokenRow)) and source.model not in vocabularies:
            problems.append(f"{where}: '{source.model}' is not among the models merged "
                            f"({', '.join(vocabularies)}); take the row from one of them")
            continue
        if isinstance(source, ModelRow) and token not in vocabularies[source.model].tokens:
            problems.append(f"{where}: '{source.model}' has no token {short_text(token)!r}; "
                            "name a model that has it, or use {kind: model_token, model, token}")
        if isinstance(source, ModelTokenRow):
            vocabulary = vocabularies[source.model]
            if source.token is not None and source.token not in vocabulary.tokens:
                problems.append(f"{where}: '{source.model}' has no token {short_text(source.token)!r} "
                                f"({vocabulary.path})")
            if source.token_id is not None and source.token_id >= vocabulary.size:
                problems.append(f"{where}: token_id {source.token_id} is beyond '{source.model}''s "
                                f"{vocabulary.size} rows")
    return problems
