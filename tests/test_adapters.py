"""LoRA adapters as merge inputs: PEFT's own numbers, streamed, and every bad adapter refused up front.

peft is the reference (an integration dependency, never imported by the library): each
adapter is made with peft on a tiny transformers model, and base+adapter through this
tool must equal peft's ``merge_and_unload()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_like.errors import InvalidCheckpointError, RecipeError
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.merge.engine import planned_merge, run_merge
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.recipe import parse_recipe

transformers = pytest.importorskip("transformers", reason="transformers is an integration dependency")
peft = pytest.importorskip("peft", reason="peft is the reference for adapters (an integration dependency)")
pytestmark = pytest.mark.integration


def tiny_llama(directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=40,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(directory)
    return directory


def make_adapter(base: Path, directory: Path, *, seed: int, **lora: object) -> Path:
    """A peft adapter of ``base`` with random (non-zero) LoRA weights, saved as peft saves it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2 + (1.0 if "magnitude" in name else 0.0))
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(directory)
    return directory


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return {k: v.detach() for k, v in peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
            .state_dict().items()}


def merge(tmp_path: Path, models: list[dict], name: str = "out", method: str = "linear", **extra: object) -> Path:
    data = {"merge_method": method, "models": models, **extra}
    with planned_merge(parse_recipe(data), MergeOptions(memory_budget=2**20)) as plan:
        run_merge(plan, tmp_path / name)
    return tmp_path / name


def merged_and_unloaded(tmp_path: Path, ref: str, name: str = "out") -> dict[str, torch.Tensor]:
    out = merge(tmp_path, [{"model": ref, "parameters": {"weight": 1.0}}], name)
    return load_file(out / "model.safetensors")


ADAPTERS = {
    "linear_layers": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "embeddings_and_saved_head": dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "rslora_with_patterns": dict(target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True,
                                 rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "dora": dict(target_modules=["q_proj", "o_proj"], use_dora=True),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_base_plus_adapter_is_peft_merge_and_unload(kind: str, tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, **ADAPTERS[kind])
    ours = merged_and_unloaded(tmp_path, f"{base}+{adapter}")
    expected = peft_merged(base, adapter)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)
    changed = [n for n, v in expected.items() if not torch.equal(v, load_file(base / "model.safetensors")[n])]
    assert changed  # the adapter did change something: the comparison means something


def test_bf16_base_rounds_once_as_peft_does(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter", seed=2, target_modules=["q_proj", "gate_proj"])
    data = [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]
    out = merge(tmp_path, data, out_dtype="bfloat16")
    ours = load_file(out / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    expected = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert all(torch.equal(ours[n], v) for n, v in expected.items())


def tiny_gpt2(directory: Path) -> Path:
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config_says", [True, False])
def test_gpt2_conv1d_adapter_is_applied_transposed_whatever_its_config_says(config_says: bool,
                                                                             tmp_path: Path) -> None:
    # PEFT decides fan_in_fan_out by the layer (Conv1D: on), overriding the config; so does this tool.
    base = tiny_gpt2(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=3, target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": config_says}))
    ours = merged_and_unloaded(tmp_path, f"{base}+{adapter}")
    expected = peft_merged(base, adapter)
    for name, value in ours.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    square = "transformer.h.0.attn.c_proj.weight"  # (16, 16): a wrong transpose would fit silently
    assert not torch.equal(ours[square], load_file(base / "model.safetensors")[square])


def test_gpt2_adapters_merge_into_an_adapter_that_peft_loads(tmp_path: Path) -> None:
    base = tiny_gpt2(tmp_path / "base")
    a = make_adapter(base, tmp_path / "a", seed=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    b = make_adapter(base, tmp_path / "b", seed=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=2)
    models = [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}},
              {"model": f"{base}+{b}", "parameters": {"weight": 0.5}}]
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models, "dtype": "float32"}
    as_model = load_file(merge(tmp_path, models, "model", method="task_arithmetic", base_model=str(base),
                               dtype="float32") / "model.safetensors")
    for combination, rank in (("cat", None), ("svd", 6)):
        out = as_adapter(tmp_path, data, combination, combination, rank=rank)
        assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        loaded = peft_merged(base, out)
        for name, value in as_model.items():
            torch.testing.assert_close(loaded[name], value, rtol=1e-4, atol=1e-5, msg=f"{combination}: {name}")


def test_an_adapter_directory_alone_brings_its_base(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    assert torch.equal(merged_and_unloaded(tmp_path, str(adapter))["model.layers.0.self_attn.q_proj.weight"],
                       peft_merged(base, adapter)["model.layers.0.self_attn.q_proj.weight"])
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(InvalidCheckpointError, match=r"names no base model.*BASE\+ADAPTER"):
        merged_and_unloaded(tmp_path, str(adapter), "again")


def test_ties_of_adapters_is_ties_of_their_merged_models(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    a = make_adapter(base, tmp_path / "a", seed=5, target_modules=["q_proj", "up_proj"])
    b = make_adapter(base, tmp_path / "b", seed=6, target_modules=["q_proj", "v_proj"])
    merge(tmp_path, [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}}], "merged_a")
    merge(tmp_path, [{"model": f"{base}+{b}", "parameters": {"weight": 1.0}}], "merged_b")
    params = {"weight": 0.8, "density": 0.5}
    ties = dict(method="ties", base_model=str(base))
    via_adapters = merge(tmp_path, [{"model": f"{base}+{a}", "parameters": params},
                                    {"model": f"{base}+{b}", "parameters": params}], "via_adapters", **ties)
    via_models = merge(tmp_path, [{"model": str(tmp_path / "merged_a"), "parameters": params},
                                  {"model": str(tmp_path / "merged_b"), "parameters": params}], "via_models", **ties)
    ours, expected = load_file(via_adapters / "model.safetensors"), load_file(via_models / "model.safetensors")
    assert all(torch.equal(ours[n], expected[n]) for n in expected)


def test_adapted_rows_are_formed_block_by_block(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=7, target_modules=["embed_tokens", "down_proj"])
    from mergekit_like.adapters import open_model

    with open_model(f"{base}+{adapter}", Path) as model:
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
            whole = model.read(name)
            blocks = torch.cat([model.read(name, rows=(s, min(s + 7, whole.shape[0])))
                                for s in range(0, whole.shape[0], 7)])
            assert torch.equal(whole, blocks), name


# --- refused, one line each, before any tensor is read -------------------------------------------

@pytest.fixture
def adapter_pair(tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_llama(tmp_path / "base")
    return base, make_adapter(base, tmp_path / "adapter", seed=8, target_modules=["q_proj", "v_proj"])


def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def plan_error(ref: str) -> str:
    with pytest.raises((InvalidCheckpointError, RecipeError)) as raised, planned_merge(
            parse_recipe({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]})):
        pass
    return str(raised.value)


def test_an_adapter_of_another_base_is_refused(adapter_pair: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, adapter = adapter_pair
    other = transformers.LlamaConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=40)
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "wide")
    no_reads(monkeypatch)
    message = plan_error(f"{tmp_path / 'wide'}+{adapter}")
    assert "do not fit the base's 'model.layers.0.self_attn.q_proj.weight'" in message
    assert "use the base model the adapter was trained on" in message.lower()


def test_an_unknown_peft_type_is_refused(adapter_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = adapter_pair
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    no_reads(monkeypatch)
    assert "peft_type 'IA3' is not supported" in plan_error(f"{base}+{adapter}")


def test_an_adapter_file_missing_a_module_its_config_names_is_refused(
        adapter_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = adapter_pair
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, str(adapter / "adapter_model.safetensors"))
    no_reads(monkeypatch)
    assert "target_modules names 'v_proj' but the adapter file has no LoRA tensors for it" in plan_error(
        f"{base}+{adapter}")
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_B" not in k},
              str(adapter / "adapter_model.safetensors"))
    assert "module 'model.layers.1.self_attn.q_proj' has no lora_B" in plan_error(f"{base}+{adapter}")


def test_adapters_are_read_as_their_adapted_models_and_never_as_weights(adapter_pair: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    base, adapter = adapter_pair
    with pytest.raises(InvalidCheckpointError, match="is a LoRA adapter"):
        open_checkpoint(adapter)  # its lora_A and lora_B are no weights
    from typer.testing import CliRunner

    from cli.main import app

    other = make_adapter(base, tmp_path / "adapter2", seed=9, target_modules=["q_proj", "v_proj"])
    result = CliRunner().invoke(app, ["soup", str(adapter), str(other), "-o", str(tmp_path / "soup")])
    assert result.exit_code == 0, result.output
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    first, second = peft_merged(base, adapter), peft_merged(base, other)
    for name, value in soup.items():  # the soup of the two adapted models, each base + its adapter
        torch.testing.assert_close(value, (first[name] + second[name]) / 2, rtol=1e-6, atol=1e-7, msg=name)


def test_the_recipe_and_card_name_base_and_adapter(adapter_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = adapter_pair
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["merge", "--method", "linear", f"{base}+{adapter}", "-p", "weight=1",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{base}` (local) (the adapter's base)" in card and f"`{adapter}` (local) (LoRA adapter)" in card
    assert f"model: {base}+{adapter}" in (tmp_path / "out" / "merge_recipe.yml").read_text()


# --- adapters merged into an adapter -------------------------------------------------------------

def as_adapter(tmp_path: Path, data: dict, combination: str, name: str, rank: int | None = None) -> Path:
    from mergekit_like.adapters.combine import merge_as_adapter

    with planned_merge(parse_recipe(data)) as plan:
        merge_as_adapter(plan, tmp_path / name, combination=combination, rank=rank)
    return tmp_path / name


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = tiny_llama(tmp_path / "base")
    a = make_adapter(base, tmp_path / "a", seed=10, target_modules=["q_proj", "up_proj", "embed_tokens"])
    b = make_adapter(base, tmp_path / "b", seed=11, target_modules=["q_proj", "v_proj"], r=2, lora_alpha=5)
    return base, a, b


def test_cat_of_adapters_is_exactly_the_weighted_sum_of_their_deltas(two_adapters: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    base, a, b = two_adapters
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.5},
            "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}},
                       {"model": f"{base}+{b}", "parameters": {"weight": 0.6}}]}
    out = as_adapter(tmp_path, data, "cat", "cat")
    loaded = peft_merged(base, out)  # peft reads the adapter we wrote
    first, second, plain = peft_merged(base, a), peft_merged(base, b), load_file(base / "model.safetensors")
    for name, value in plain.items():
        expected = value + 0.5 * ((first[name] - value) + 0.6 * (second[name] - value))
        torch.testing.assert_close(loaded[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert ranks == {2, 4, 6} and config["lora_alpha"] == config["r"]  # 4 + 2 where both adapt a module; scaling 1


def test_svd_of_a_ties_merge_of_adapters_equals_the_ties_merge_of_their_models_at_full_rank(
        two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, a, b = two_adapters
    models = [{"model": f"{base}+{a}", "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": f"{base}+{b}", "parameters": {"weight": 0.7, "density": 0.5}}]
    data = {"merge_method": "ties", "base_model": str(base), "models": models, "dtype": "float32"}
    out = as_adapter(tmp_path, data, "svd", "ties_adapter", rank=16)  # full rank: the SVD loses nothing
    as_model = merge(tmp_path, models, "ties_model", method="ties", base_model=str(base), dtype="float32")
    loaded, expected = peft_merged(base, out), load_file(as_model / "model.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_magnitude_prune_of_adapters_cut_to_a_rank_is_peft_add_weighted_adapter(
        two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, a, b = two_adapters
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 0.7], "pruned", combination_type="magnitude_prune_svd",
                               density=0.5, svd_rank=3)
    model.set_adapter("pruned")
    expected = model.merge_and_unload().state_dict()
    models = [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}},
              {"model": f"{base}+{b}", "parameters": {"weight": 0.7}}]
    data = {"merge_method": "magnitude_prune", "base_model": str(base), "parameters": {"density": 0.5},
            "models": models, "dtype": "float32"}
    loaded = peft_merged(base, as_adapter(tmp_path, data, "svd", "pruned", rank=3))
    changed = 0
    for name, value in load_file(base / "model.safetensors").items():
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(loaded[name], value)
    assert changed >= 5  # q, v and up projections of both layers and the embedding


def test_a_low_rank_cut_reports_what_it_keeps_and_loads_in_peft(two_adapters: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    base, a, b = two_adapters
    from mergekit_like.adapters.combine import merge_as_adapter

    data = {"merge_method": "linear", "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}},
                                                 {"model": f"{base}+{b}", "parameters": {"weight": 1.0}}]}
    with planned_merge(parse_recipe(data)) as plan:
        result = merge_as_adapter(plan, tmp_path / "cut", combination="svd", rank=1)
    assert result.rank == 1 and result.kept_fraction is not None and 0.3 < result.kept_fraction < 1.0
    assert json.loads((tmp_path / "cut" / "adapter_config.json").read_text())["r"] == 1
    peft_merged(base, tmp_path / "cut")


def test_an_adapter_output_of_models_or_of_a_non_linear_cat_is_refused(two_adapters: tuple[Path, Path, Path]) -> None:
    base, a, b = two_adapters
    from mergekit_like.adapters.combine import adapter_merge_problems

    mixed = {"merge_method": "linear", "models": [{"model": f"{base}+{a}", "parameters": {"weight": 1.0}},
                                                  {"model": str(base), "parameters": {"weight": 1.0}}]}
    with planned_merge(parse_recipe(mixed)) as plan:
        assert any("these are models" in p for p in adapter_merge_problems(plan, "svd", 4))
    ties = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": f"{base}+{m}", "parameters": {"weight": 1.0, "density": 0.5}} for m in (a, b)]}
    with planned_merge(parse_recipe(ties)) as plan:
        assert adapter_merge_problems(plan, "svd", 4) == []
        problems = adapter_merge_problems(plan, "cat", None)
        assert any("cat combines linear and task_arithmetic only" in p for p in problems)
