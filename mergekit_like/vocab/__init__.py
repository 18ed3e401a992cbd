"""Vocabularies: merging models whose tokenizers differ, by token rather than by row."""

from mergekit_like.vocab.alignment import Alignment, DefaultRow, align
from mergekit_like.vocab.plan import VocabularyPlan, plan_vocabulary
from mergekit_like.vocab.spec import ModelRow, ModelTokenRow, TokenizerSpec, TokenRule, ZeroRow, parse_tokenizer

__all__ = [
    "Alignment", "DefaultRow", "ModelRow", "ModelTokenRow", "TokenRule", "TokenizerSpec", "VocabularyPlan", "ZeroRow",
    "align", "parse_tokenizer", "plan_vocabulary",
]
