"""Merging by token: the alignment rules in closed form, row gathering, tied heads and bad input.

The goldens of mergekit itself are in test_vocab_mergekit_parity.py; here each rule is
checked on vocabularies small enough to write out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner
from vocab_models import HIDDEN as MODEL_HIDDEN
from vocab_models import write_model, write_tokenizer

from cli.main import app
from mergekit_like.errors import InvalidCheckpointError, RecipeError
from mergekit_like.io.reader import Checkpoint
from mergekit_like.merge.engine import planned_merge, run_merge
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.recipe import parse_recipe
from mergekit_like.vocab.alignment import align
from mergekit_like.vocab.rows import AlignedRows, gather_rows, spans
from mergekit_like.vocab.spec import ModelRow, ModelTokenRow, TokenRule, ZeroRow, parse_tokenizer
from mergekit_like.vocab.tokenizers_io import Vocabulary

WORDS = ["<unk>", "<s>", "a", "b", "c", "d"]


def vocab(tokens: list[str], size: int | None = None) -> Vocabulary:
    return Vocabulary(Path("tokenizer.json"), {t: i for i, t in enumerate(tokens)}, (), size or len(tokens))


# --- the alignment rules -------------------------------------------------------------------------

def test_rows_follow_tokens_and_missing_tokens_get_mergekits_defaults() -> None:
    out = {t: i for i, t in enumerate(["a", "b", "c", "d", "e"])}
    vocabularies = {"m1": vocab(["b", "a", "c"]), "m2": vocab(["a", "b", "d", "c"]), "base": vocab(["a", "b", "c", "e"])}
    alignment = align(out, 5, vocabularies, "base", {})
    assert alignment.sources == {"m1": (1, 0, 2, -1, -1), "m2": (0, 1, 3, 2, -1), "base": (0, 1, 2, -1, 3)}
    assert alignment.defaults[3].parts == (("m2", 2),)  # only m2 has "d": its row
    assert alignment.defaults[4].parts == (("base", 3),)  # only the base has "e"
    assert set(alignment.defaults) == {3, 4}  # a, b and c are in every model: each keeps its own row


def test_a_token_of_several_models_but_not_all_is_the_base_row_else_their_mean() -> None:
    out = {"a": 0, "x": 1}
    with_base = align(out, 2, {"m1": vocab(["a", "x"]), "m2": vocab(["a"]), "base": vocab(["a", "x"])}, "base", {})
    assert with_base.defaults[1].parts == (("base", 1),)
    no_base = align(out, 2, {"m1": vocab(["a", "x"]), "m2": vocab(["x", "a"]), "m3": vocab(["a"])}, None, {})
    assert no_base.defaults[1].parts == (("m1", 1), ("m2", 0))
    nobody = align({"a": 0, "new": 1}, 2, {"m1": vocab(["a"])}, None, {})
    assert nobody.defaults[1].parts == ()


def test_token_rules_override_the_default_and_force_replaces_every_models_row() -> None:
    out = {"a": 0, "b": 1, "x": 2}
    vocabularies = {"m1": vocab(["a", "b", "x"]), "m2": vocab(["a", "b"])}
    rules = {"x": TokenRule(ZeroRow()), "a": TokenRule(ModelRow("m2"), force=True),
             "b": TokenRule(ModelTokenRow("m1", token="x"))}
    alignment = align(out, 3, vocabularies, None, rules)
    assert alignment.defaults[2].parts == ()
    assert alignment.defaults[0].parts == (("m2", 0),) and alignment.forced == {0}
    assert 1 not in alignment.defaults  # b is in both and not forced: the rule is not needed


def naive_aligned(tensors: dict[str, torch.Tensor], vocabularies: dict[str, Vocabulary], out: dict[str, int],
                  rows: int, base: str | None, rules: dict[str, TokenRule]) -> dict[str, torch.Tensor]:
    """mergekit's PermutedVocabulary, written out independently on whole tensors."""
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    defaults = {}
    for token, i in out.items():
        rule = rules.get(token)
        has = [m for m in models if token in vocabularies[m].tokens]
        if len(has) == len(models) and not (rule and rule.force):
            continue
        if rule and isinstance(rule.source, ZeroRow):
            defaults[token] = torch.zeros(ROW, dtype=dtype)
        elif rule and isinstance(rule.source, ModelRow):
            defaults[token] = tensors[rule.source.model][vocabularies[rule.source.model].tokens[token]]
        elif rule and isinstance(rule.source, ModelTokenRow):
            defaults[token] = tensors[rule.source.model][vocabularies[rule.source.model].tokens[rule.source.token]]
        elif len(has) == 1:
            defaults[token] = tensors[has[0]][vocabularies[has[0]].tokens[token]]
        elif not has:
            defaults[token] = torch.zeros(ROW, dtype=dtype)
        elif base in has:
            defaults[token] = tensors[base][vocabularies[base].tokens[token]]
        else:
            acc = torch.zeros(ROW, dtype=dtype)
            for m in has:
                acc = acc + tensors[m][vocabularies[m].tokens[token]]
            defaults[token] = acc / len(has)
    result = {}
    for m in models:
        new = torch.zeros(rows, ROW, dtype=dtype)
        for token, i in out.items():
            forced = token in rules and rules[token].force
            if token in vocabularies[m].tokens and not forced:
                new[i] = tensors[m][vocabularies[m].tokens[token]]
            else:
                new[i] = defaults[token]
        if rows > len(out):
            new[len(out):] = torch.mean(new[:len(out)], dim=0)
        result[m] = new
    return result


ROW = 3  # the width of the hand-made rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_blocks_equal_mergekits_whole_tensor_alignment(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    letters = [chr(c) for c in range(ord("a"), ord("a") + 26)]
    shuffled = [letters[i] for i in torch.randperm(26, generator=g).tolist()]
    vocabularies = {"m1": vocab(shuffled[:20]), "m2": vocab(letters[5:] + ["tool"]), "m3": vocab(letters[:22]),
                    "base": vocab(letters[3:24])}
    out = {t: i for i, t in enumerate(letters + ["tool", "new"])}
    rows = 32  # padded from 28
    rules = {"new": TokenRule(ModelTokenRow("m1", token=shuffled[0])), "c": TokenRule(ModelRow("m3"), force=True),
             "z": TokenRule(ZeroRow())}
    tensors = {m: torch.randn(len(v.tokens), ROW, generator=g).to(dtype) for m, v in vocabularies.items()}
    expected = naive_aligned(tensors, vocabularies, out, rows, "base", rules)
    alignment = align(out, rows, vocabularies, "base", rules)
    reads: list[int] = []

    def read(model: str, indices: list[int]) -> torch.Tensor:
        reads.append(len(indices))
        return tensors[model][torch.tensor(indices, dtype=torch.long)]

    gathered = AlignedRows(alignment, read, (ROW,), dtype, torch.device("cpu"))
    for model, value in expected.items():
        whole = gathered.block(model, None)
        blocks = torch.cat([gathered.block(model, (s, min(s + 5, rows))) for s in range(0, rows, 5)])
        assert torch.equal(whole, value) and torch.equal(blocks, value), model


def test_rows_are_read_in_few_spans_whatever_their_order() -> None:
    assert spans([9, 1, 2, 3, 40, 41], max_gap=4) == [(1, 4), (9, 10), (40, 42)]
    table = torch.arange(100).reshape(50, 2)
    calls: list[tuple[int, int]] = []

    def read_span(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return table[start:stop]

    order = [7, 3, 3, 45, 8, 0]
    assert torch.equal(gather_rows(read_span, order), table[order])
    assert calls == [(0, 4), (7, 9), (45, 46)]  # near rows in one read while it reads at most twice what it needs


def test_a_shuffled_vocabulary_is_read_about_once_block_by_block() -> None:
    g = torch.Generator().manual_seed(1)
    rows = 20_000
    order = torch.randperm(rows, generator=g).tolist()
    read = 0
    for start in range(0, rows, 2000):
        read += sum(stop - first for first, stop in spans(order[start:start + 2000]))
    assert read <= 1.3 * rows  # never most of the tensor per block


# --- the recipe section --------------------------------------------------------------------------

def test_tokenizer_section_round_trips_and_legacy_key_stays_legacy() -> None:
    data = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}],
            "tokenizer": {"source": "b", "pad_to_multiple_of": 8, "tokens": {
                "<x>": {"source": {"kind": "zero"}}, "<y>": {"source": "a", "force": True},
                "<z>": {"source": {"kind": "model_token", "model": "b", "token_id": 3}}}},
            "chat_template": "chatml"}
    recipe = parse_recipe(data)
    again = parse_recipe(recipe.to_dict())
    assert again.tokenizer == recipe.tokenizer and again.chat_template == "chatml"
    assert again.tokenizer is not None and again.tokenizer.models() == ["b", "a"]
    legacy = parse_recipe({**data, "tokenizer": None, "tokenizer_source": "union"})
    assert legacy.to_dict()["tokenizer_source"] == "union" and "tokenizer" not in legacy.to_dict()


@pytest.mark.parametrize(("section", "message"), [
    ({"source": 3}, "tokenizer.source must be union, base or a model path"),
    ({"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}}, "needs one of token or token_id"),
    ({"tokens": {"x": {"source": {"kind": "nope"}}}}, "must be a model, {kind: zero}"),
    ({"tokens": {"x": {"force": "yes"}}}, "force must be true or false"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
])
def test_bad_tokenizer_sections_are_one_line_each(section: dict, message: str) -> None:
    problems: list[str] = []
    parse_tokenizer(section, problems)
    assert len(problems) == 1 and message in problems[0], problems


def test_both_forms_at_once_and_a_bad_chat_template_are_refused() -> None:
    base = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    with pytest.raises(RecipeError, match="either tokenizer"):
        parse_recipe({**base, "tokenizer": {"source": "union"}, "tokenizer_source": "base"})
    with pytest.raises(RecipeError, match="neither a built-in name"):
        parse_recipe({**base, "chat_template": "chatmlx"})


# --- merges of small models ----------------------------------------------------------------------

def linear(models: list[Path], **extra: object) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            "dtype": "float32", **extra}


def merge(tmp_path: Path, data: dict, name: str = "out", **options: object) -> Path:
    with planned_merge(parse_recipe(data), MergeOptions(**options)) as plan:  # type: ignore[arg-type]
        run_merge(plan, tmp_path / name)
    return tmp_path / name


def test_union_of_a_shuffled_and_an_extended_vocabulary_merges_by_token(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", WORDS, seed=1)
    b = write_model(tmp_path / "b", list(reversed(WORDS)), seed=2, added=[("<tool>", True)])
    out = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"}))
    merged = load_file(out / "model.safetensors")
    from tokenizers import Tokenizer
    tokens = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert tokens == {**{t: i for i, t in enumerate(WORDS)}, "<tool>": 6}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for i, word in enumerate(WORDS):  # a's row i is word i; b's row of word i is 5 - i
            assert torch.allclose(merged[name][i], (a[name][i] + b[name][5 - i]) / 2)
        assert torch.equal(merged[name][6], b[name][6])  # only b has <tool>: its row, in both models
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 7 and config["bos_token_id"] == 1
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added["6"]["content"] == "<tool>" and added["6"]["special"] is True


def test_a_model_as_the_source_renumbers_the_configs_token_ids(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", list(reversed(WORDS)), seed=2, config={"bos_token_id": 4})
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [1, 2]}))
    out = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": str(tmp_path / "b")}))
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == 4  # "<s>", id 1 in the base, is 4 in b's vocabulary
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 4, "eos_token_id": [4, 3]}


def test_padding_rows_are_each_models_mean_row(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", WORDS, seed=1)
    out = merge(tmp_path, linear([tmp_path / "a"], tokenizer={"source": "base", "pad_to_multiple_of": 4}))
    embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.shape == (8, MODEL_HIDDEN)
    assert torch.equal(embed[:6], a["model.embed_tokens.weight"])
    assert torch.equal(embed[6], torch.mean(a["model.embed_tokens.weight"], dim=0))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8


def test_embedding_rows_are_streamed_in_blocks_with_the_same_result(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(1200)]
    write_model(tmp_path / "big1", words, seed=3, hidden=256)
    write_model(tmp_path / "big2", list(reversed(words)) + ["extra"], seed=4, hidden=256)
    data = linear([tmp_path / "big1", tmp_path / "big2"], tokenizer={"source": "union"})
    whole = merge(tmp_path, data, "whole")
    with planned_merge(parse_recipe(data), MergeOptions(memory_budget=2**20)) as plan:
        embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
        assert embed.aligned and embed.chunks is not None and len(embed.chunks) > 4
        run_merge(plan, tmp_path / "blocks")
    blocks = load_file(tmp_path / "blocks" / "model.safetensors")
    expected = load_file(whole / "model.safetensors")
    assert expected.keys() == blocks.keys()
    assert all(torch.equal(value, blocks[name]) for name, value in expected.items())


# --- tied heads ----------------------------------------------------------------------------------

def test_a_tied_model_gives_its_embedding_as_the_head_and_the_output_says_untied(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", WORDS, seed=1)
    b = write_model(tmp_path / "b", WORDS, seed=2, head=False, tied=True)
    for base in ("a", "b"):  # the base stores the head, or ties it
        out = merge(tmp_path, {**linear([tmp_path / "a", tmp_path / "b"]), "base_model": str(tmp_path / base)}, f"out_{base}")
        merged = load_file(out / "model.safetensors")
        assert torch.allclose(merged["lm_head.weight"], (a["lm_head.weight"] + b["model.embed_tokens.weight"]) / 2)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_models_without_a_head_merge_to_a_tied_model(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1, head=False, tied=True)
    write_model(tmp_path / "b", WORDS, seed=2, head=False, tied=True)
    out = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"}))
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


# --- bad input: one line each, before any tensor is read ----------------------------------------

@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def plan_problems(data: dict) -> str:
    with pytest.raises((RecipeError, InvalidCheckpointError)) as raised, planned_merge(parse_recipe(data)):
        pass
    return str(raised.value)


def test_a_token_no_model_has_without_a_source_is_refused(tmp_path: Path, no_tensor_reads: None) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    message = plan_problems(linear([tmp_path / "a"], tokenizer={"tokens": {"<nobody>": {"force": True}}}))
    assert "tokenizer.tokens['<nobody>']: no model has this token" in message


def test_a_token_rule_naming_a_model_outside_the_merge_is_refused(tmp_path: Path, no_tensor_reads: None) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "other", WORDS, seed=2)
    rules = {"a": {"source": str(tmp_path / "other"), "force": True}}
    assert "is not among the models merged" in plan_problems(linear([tmp_path / "a"], tokenizer={"tokens": rules}))


def test_a_tokenizer_of_another_model_is_refused(tmp_path: Path, no_tensor_reads: None) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", WORDS, seed=2)
    write_tokenizer(tmp_path / "b", WORDS + [f"w{i}" for i in range(10)])  # 16 tokens, 6 rows
    message = plan_problems(linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"}))
    assert "10 tokens of its own vocabulary beyond the embedding's 6 rows" in message
    assert str(tmp_path / "b" / "tokenizer.json") in message


def test_added_tokens_beyond_the_rows_are_left_out_as_mergekit_does(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", WORDS, seed=2)
    write_tokenizer(tmp_path / "b", WORDS, added=[("<unused>", True)])  # added, never resized
    out = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"}))
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 6


@pytest.mark.parametrize(("files", "message"), [
    ((), "has no tokenizer (no tokenizer.json)"),
    (("tokenizer.model",), "has a tokenizer only as tokenizer.model (no tokenizer.json); save it as tokenizer.json"),
])
def test_a_model_without_a_readable_tokenizer_is_refused(tmp_path: Path, no_tensor_reads: None,
                                                         files: tuple[str, ...], message: str) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", WORDS, seed=2)
    (tmp_path / "b" / "tokenizer.json").unlink()
    for name in files:
        (tmp_path / "b" / name).write_bytes(b"\x00")
    assert message in plan_problems(linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"}))


def test_a_tokenizer_source_that_does_not_exist_is_refused(tmp_path: Path, no_tensor_reads: None) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    message = plan_problems(linear([tmp_path / "a"], tokenizer_source=str(tmp_path / "missing")))
    assert "does not exist" in message


def test_tokenizer_source_union_writes_config_and_tokenizer(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    out = merge(tmp_path, linear([tmp_path / "a"], tokenizer_source="union"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}


def test_config_and_generation_config_come_from_the_base_not_the_tokenizer_source(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1, config={"max_position_embeddings": 128})
    write_model(tmp_path / "b", WORDS, seed=2, config={"max_position_embeddings": 4096,
                                                       "architectures": ["BertModel"]})
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "b" / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    out = merge(tmp_path, {**linear([tmp_path / "a", tmp_path / "b"], tokenizer_source=str(tmp_path / "b")),
                           "base_model": str(tmp_path / "a")}, allow_crimes=True)
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


def test_dry_run_prints_the_vocabulary_plan(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", list(reversed(WORDS)), seed=2, added=[("<tool>", True)])
    recipe = tmp_path / "recipe.yml"
    import yaml
    recipe.write_text(yaml.safe_dump(linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union"})))
    result = CliRunner().invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["vocabulary"]
    assert plan["tokens"] == 7 and plan["tokens_added_by_model"][str(tmp_path / "b")] == 1
    assert plan["models"][str(tmp_path / "b")]["moved"] == 6
    assert plan["default_rows"] == {f"only in {tmp_path / 'b'}": 1}
    text = CliRunner().invoke(app, ["merge", str(recipe), "--dry-run"]).output
    assert "vocabulary (union): 7 tokens" in text


def test_the_union_needs_no_copy_of_any_input_tokenizer_file(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    (tmp_path / "a" / "vocab.txt").write_text("stale")  # an old file that would disagree with the new vocabulary
    out = merge(tmp_path, linear([tmp_path / "a"], tokenizer={"source": "union"}))
    assert not (out / "vocab.txt").exists()


def test_a_chat_template_without_a_tokenizer_section_goes_with_the_copied_tokenizer(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", WORDS, seed=2)
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'old' }}"}))
    for name in ("a", "b"):
        (tmp_path / name / "chat_template.jinja").write_text("{{ 'shared' }}")
    out = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], chat_template="chatml"))
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    auto = merge(tmp_path, linear([tmp_path / "a", tmp_path / "b"], chat_template="auto"), "auto")
    assert (auto / "chat_template.jinja").read_text() == "{{ 'shared' }}"  # the one most models have


@pytest.mark.parametrize(("name", "expected"), [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", "<s> [INST] Be brief.\n\nHi [/INST]"),
    ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"),
    ("exaone", "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]"),
])
def test_each_built_in_chat_template_renders_its_format(name: str, expected: str) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from mergekit_like.vocab.chat_templates import BUILT_IN

    # As transformers renders a chat template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = env.from_string(BUILT_IN[name]).render(messages=messages, add_generation_prompt=True,
                                                      bos_token="<s>", eos_token="</s>")
    assert rendered == expected


def test_a_model_without_a_head_whose_config_unties_it_is_refused_not_tied(tmp_path: Path) -> None:
    write_model(tmp_path / "a", WORDS, seed=1)
    write_model(tmp_path / "b", WORDS, seed=2, head=False, tied=False)  # an incomplete export
    message = plan_problems(linear([tmp_path / "a", tmp_path / "b"]))
    assert "tensor(s) missing from" in message and "lm_head.weight" in message


def test_a_token_rule_from_a_model_a_slice_does_not_read_is_refused_before_the_merge(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        write_model(tmp_path / name, WORDS, seed=seed, added=[("<tool>", True)] if name == "b" else (), layers=2)
    slices = [{"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 1]}]},
              {"sources": [{"model": str(tmp_path / "b"), "layer_range": [1, 2]}]}]
    data = {"merge_method": "passthrough", "slices": slices, "dtype": "float32",
            "tokenizer": {"source": "union", "tokens": {"<tool>": {"source": str(tmp_path / "b")}}}}
    message = plan_problems(data)
    assert "takes its row from" in message and "which this tensor is not merged from" in message


def test_padding_through_the_engine_in_row_blocks_is_the_whole_tensors(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(700)]
    write_model(tmp_path / "a", words, seed=1, hidden=256)
    write_model(tmp_path / "b", list(reversed(words)), seed=2, hidden=256)
    data = linear([tmp_path / "a", tmp_path / "b"], tokenizer={"source": "union", "pad_to_multiple_of": 512})
    whole = load_file(merge(tmp_path, data, "whole", memory_budget=2**30) / "model.safetensors")
    blocks = load_file(merge(tmp_path, data, "blocks", memory_budget=2**20) / "model.safetensors")
    assert whole["model.embed_tokens.weight"].shape[0] == 1024
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)
