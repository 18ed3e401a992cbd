"""Merges of models whose vocabularies differ give mergekit's numbers, token by token.

tests/data/mergekit_vocab holds tiny Llama models with their own BPE tokenizers (one
with shuffled ids, one with ten added tokens, one trained on other text, tied ones),
the recipes and mergekit 0.1.5's whole output folders (see its README). Each recipe
runs through this tool and every tensor must equal mergekit's bit for bit, embedding
and head rows compared by token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_like.merge.multidoc import load_recipe_set, merge_documents

DATA = Path(__file__).parent / "data" / "mergekit_vocab"
CASES = sorted(p.name for p in (DATA / "cases").iterdir() if (p / "expected").is_dir())
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# mergekit adds a union's tokens from a model other than the base in the order of a Rust hash map,
# which changes from run to run; these cases are compared by token, the others by id as well.
UNORDERED = {"union_retrained_linear"}


def vocabulary(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case merged once by this tool, as the merge command runs a recipe file."""
    out = tmp_path_factory.mktemp("vocab_parity")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(DATA)  # the recipes name the models relative to the data folder
        for case in CASES:
            merge_documents(load_recipe_set(DATA / "cases" / case / "recipe.yml"), out / case)
            results[case] = out / case
    return results


@pytest.mark.parametrize("case", CASES)
def test_tensors_and_vocabulary_match_mergekit_bit_for_bit(case: str, merged: dict[str, Path]) -> None:
    expected_dir = DATA / "cases" / case / "expected"
    ours_vocab, theirs_vocab = vocabulary(merged[case]), vocabulary(expected_dir)
    assert set(ours_vocab) == set(theirs_vocab)
    if case not in UNORDERED:
        assert ours_vocab == theirs_vocab
    ours, theirs = load_file(merged[case] / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        actual = ours[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if name in VOCABULARY_TENSORS:
            order = sorted(theirs_vocab, key=theirs_vocab.__getitem__)
            ours_rows = torch.tensor([ours_vocab[t] for t in order])
            assert torch.equal(actual[ours_rows], expected[:len(order)]), name
            assert torch.equal(actual[len(order):], expected[len(order):]), f"{name}: padding rows"
        else:
            assert torch.equal(actual, expected), name


@pytest.mark.parametrize("case", CASES)
def test_config_states_the_vocabulary_and_tying_of_the_tensors_written(case: str, merged: dict[str, Path]) -> None:
    config = json.loads((merged[case] / "config.json").read_text())
    theirs = json.loads((DATA / "cases" / case / "expected" / "config.json").read_text())
    assert config["vocab_size"] == theirs["vocab_size"]
    assert config["architectures"] == theirs["architectures"]
    has_head = "lm_head.weight" in load_file(merged[case] / "model.safetensors")
    # mergekit keeps the base's flag; a head written beside a tied flag would be tied away on loading.
    assert config["tie_word_embeddings"] is (not has_head)


# Cases whose mergekit output is itself consistent (an untied base keeps the flag mergekit copies).
LOADABLE = ["union_linear", "union_task_arithmetic", "union_ties", "model_source_forced", "union_pad",
            "base_source_legacy", "union_chatml"]


@pytest.mark.integration
@pytest.mark.parametrize("case", LOADABLE)
def test_output_loads_tokenizes_added_tokens_and_gives_mergekits_logits(case: str, merged: dict[str, Path]) -> None:
    pytest.importorskip("transformers", reason="transformers is an integration dependency")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours_dir, theirs_dir = merged[case], DATA / "cases" / case / "expected"
    tokenizer = AutoTokenizer.from_pretrained(ours_dir)
    vocab = vocabulary(ours_dir)
    added = [t for t in ("<|im_start|>", "<|im_end|>", "<tool_call>") if t in vocab]
    for token in added:
        assert tokenizer.convert_tokens_to_ids(token) == vocab[token]
        assert vocab[token] in tokenizer(f"merge {token} this")["input_ids"]
    ids = tokenizer("the merged checkpoint " + " ".join(added), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(ours_dir)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(theirs_dir)(ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.integration
def test_chat_template_renders_as_mergekits(merged: dict[str, Path]) -> None:
    pytest.importorskip("transformers", reason="transformers is an integration dependency")
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Merge these."}]
    rendered, theirs = (
        AutoTokenizer.from_pretrained(d).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for d in (merged["union_chatml"], DATA / "cases" / "union_chatml" / "expected"))
    assert rendered == theirs and rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
