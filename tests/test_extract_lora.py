"""extract-lora: closed-form low-rank changes come back exactly, the adapter loads in peft with the
fine-tune's logits and merges back through this tool, and bad inputs are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_like.adapters.config import AdapterConfig
from mergekit_like.adapters.extract import ExtractOptions, extract_lora, kept_rank, low_rank
from mergekit_like.adapters.view import PEFT_PREFIX
from mergekit_like.adapters.writer import modules_to_save, pattern_key, target_modules
from mergekit_like.errors import OptionsError

runner = CliRunner()
D, INTER, VOCAB = 24, 40, 32


def rank_r(shape: tuple[int, int], r: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A random matrix of rank exactly ``r``."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g)


def toy_models(tmp_path: Path, *, r: int = 3, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A one-layer Llama-style base and a fine-tune: q_proj and up_proj changed by rank ``r``, a norm changed."""
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(VOCAB, D, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(D, D, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(INTER, D, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(D),
        "lm_head.weight": torch.randn(VOCAB, D, generator=g),
    }
    ft = dict(base)
    ft["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"] + rank_r((D, D), r, 1)
    ft["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"] + rank_r((INTER, D), r, 2)
    ft["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] + 0.1
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return (write_checkpoint(tmp_path / "base", {k: v.to(dtype) for k, v in base.items()}, config=config),
            write_checkpoint(tmp_path / "ft", {k: v.to(dtype) for k, v in ft.items()}, config=config))


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def lora_delta(adapter: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    b = adapter[f"{PEFT_PREFIX}{module}.lora_B.weight"].float()
    return b @ adapter[f"{PEFT_PREFIX}{module}.lora_A.weight"].float()


# -- the math ------------------------------------------------------------------------------


def test_an_exact_rank_r_change_comes_back_to_float32_precision(tmp_path: Path) -> None:
    base, ft = toy_models(tmp_path, r=3)
    result = extract_lora(str(ft), str(base), tmp_path / "out", ExtractOptions(rank=3))
    adapter, before, after = tensors(tmp_path / "out"), tensors(base), tensors(ft)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        delta = after[module + ".weight"] - before[module + ".weight"]
        assert (lora_delta(adapter, module) - delta).norm() / delta.norm() < 1e-5
    assert [m.rank for m in result.modules] == [3, 3]
    assert all(abs(m.energy - 1) < 1e-6 and m.error < 1e-5 for m in result.modules)
    overall = result.overall()
    assert overall is not None and overall.error < 1e-5
    assert result.saved == ("model.layers.0.input_layernorm",)  # embeddings and head did not change
    assert result.unchanged == 2 and result.left_out == ()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base)
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj"]
    assert config["modules_to_save"] == ["input_layernorm"]
    assert "| q_proj | 1 | 3 |" in (tmp_path / "out" / "README.md").read_text()


def test_a_lower_rank_keeps_the_largest_singular_values() -> None:
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(1)))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.0] * 16)
    matrix = u[:, :20] * s @ v.T
    cut = low_rank(matrix, rank=2, energy=None)
    assert cut.b.shape == (30, 2) and cut.a.shape == (2, 20)
    assert cut.kept / cut.total == pytest.approx(25 / 30, rel=1e-5)  # (16 + 9) / (16 + 9 + 4 + 1)
    assert (matrix - cut.b @ cut.a).norm() == pytest.approx(5 ** 0.5, rel=1e-5)
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 30.0, None, 0.8) == 2  # 25/30 >= 0.8
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 30.0, None, 0.9) == 3  # 29/30
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 30.0, 2, 0.9) == 2  # capped by the rank
    assert kept_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 30.0, None, 1.0) == 4


def test_randomized_svd_recovers_a_low_rank_change_and_is_reproducible() -> None:
    matrix = rank_r((300, 200), 4, 5)
    first = low_rank(matrix, rank=4, energy=None, sketch=14, niter=2, seed=7)
    again = low_rank(matrix, rank=4, energy=None, sketch=14, niter=2, seed=7)
    assert torch.equal(first.b, again.b) and torch.equal(first.a, again.a)
    assert (matrix - first.b @ first.a).norm() / matrix.norm() < 1e-5


def test_a_bf16_adapter_merges_back_through_this_tool(tmp_path: Path) -> None:
    """``merge --method linear BASE+OUT -p weight=1`` gives the base plus the stored low-rank delta."""
    base, ft = toy_models(tmp_path, r=2, dtype=torch.bfloat16)
    result = runner.invoke(app, ["extract-lora", str(ft), "--base", str(base), "--rank", "2", "-o",
                                 str(tmp_path / "lora"), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", "--method", "linear", f"{base}+{tmp_path / 'lora'}", "-p", "weight=1",
                                 "-o", str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.output
    merged, before, after, adapter = (tensors(tmp_path / "merged"), tensors(base), tensors(ft),
                                      tensors(tmp_path / "lora"))
    assert adapter[f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"].dtype == torch.bfloat16
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        name = module + ".weight"
        expected = (before[name].float() + lora_delta(adapter, module)).to(torch.bfloat16)
        assert torch.equal(merged[name], expected), name
        torch.testing.assert_close(merged[name], after[name], rtol=0.02, atol=0.02)
    assert torch.equal(merged["model.layers.0.input_layernorm.weight"], after["model.layers.0.input_layernorm.weight"])
    assert torch.equal(merged["lm_head.weight"], before["lm_head.weight"])


def test_targets_pick_modules_and_the_others_are_reported(tmp_path: Path) -> None:
    base, ft = toy_models(tmp_path)
    result = runner.invoke(app, ["extract-lora", str(ft), "-b", str(base), "-r", "3", "-o", str(tmp_path / "out"),
                                 "--target", "q_proj", "--norms", "skip", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [m["module"] for m in summary["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert set(summary["by_type"]) == {"q_proj"} and summary["overall"]["relative_error"] < 1e-5
    assert summary["left_out"] == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"]
    assert summary["saved"] == []
    adapter = tensors(tmp_path / "out")
    assert all("q_proj" in k for k in adapter)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"] and config["modules_to_save"] is None


def test_config_names_pick_exactly_the_chosen_modules() -> None:
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.input_layernorm",
               "model.layers.1.input_layernorm", "model.norm", "vision.layers.0.self_attn.q_proj"]
    assert target_modules(modules[:2], modules) == tuple(modules[:2])  # q_proj would take the vision one too
    assert target_modules([*modules[:2], modules[5]], modules) == ("q_proj",)
    assert modules_to_save(modules[2:5], modules) == ("norm",)  # a plain suffix, as PEFT matches it
    assert modules_to_save(modules[2:4], modules) == ("input_layernorm",)
    # rank_pattern keys are regular expressions matching a dotted suffix: anchored where that is ambiguous.
    outer = "vision.model.layers.0.mlp.up_proj"
    inner = outer.removeprefix("vision.")
    key = pattern_key(inner, [inner, outer])
    config = AdapterConfig(r=4, lora_alpha=4, rank_pattern={key: 2})
    assert config.rank(inner) == 2 and config.rank(outer) == 4
    assert pattern_key(outer, [inner, outer]) == outer.replace(".", "\\.")


# -- refused before any work ------------------------------------------------------------------


def _bad_shape(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    write_checkpoint(tmp_path / "other", {**tensors(ft), "lm_head.weight": torch.zeros(VOCAB + 1, D)})
    return [str(tmp_path / "other"), "--base", str(base), "--rank", "2"]


def _bad_names(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    write_checkpoint(tmp_path / "other", {**tensors(ft), "extra.weight": torch.zeros(2, 2)})
    return [str(tmp_path / "other"), "--base", str(base), "--rank", "2"]


def _zero_rank(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    return [str(ft), "--base", str(base), "--rank", "0"]


def _output_exists(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return [str(ft), "--base", str(base), "--rank", "2"]


def _adapter_as_finetune(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    extract_lora(str(ft), str(base), tmp_path / "adapter", ExtractOptions(rank=1))
    return [str(tmp_path / "adapter"), "--base", str(base), "--rank", "2"]


def _adapter_as_base(tmp_path: Path, base: Path, ft: Path) -> list[str]:
    extract_lora(str(ft), str(base), tmp_path / "adapter", ExtractOptions(rank=1))
    return [str(ft), "--base", str(tmp_path / "adapter"), "--rank", "2"]


BAD = {
    "shapes differ": (_bad_shape, "lm_head.weight"),
    "names differ": (_bad_names, "extra.weight"),
    "rank below 1": (_zero_rank, "at least 1"),
    "output exists": (_output_exists, "--overwrite"),
    "adapter as fine-tune": (_adapter_as_finetune, "is a LoRA adapter"),
    "adapter as base": (_adapter_as_base, "is a LoRA adapter"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_one_line_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    base, ft = toy_models(tmp_path)
    make, expected = BAD[case]
    args = make(tmp_path, base, ft)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["extract-lora", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new: no output, no temporary
    if case == "output exists":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_option_problems_are_reported_together() -> None:
    with pytest.raises(OptionsError) as caught:
        ExtractOptions(rank=0, energy=1.5, fast=False, embeddings="all")  # type: ignore[arg-type]
    assert len(caught.value.problems) == 3
    with pytest.raises(OptionsError, match="--fast needs --rank"):
        ExtractOptions(energy=0.9, fast=True)


# -- peft loads what is written ---------------------------------------------------------------


def peft_or_skip() -> tuple[object, object]:
    transformers = pytest.importorskip("transformers", reason="transformers is an integration dependency")
    peft = pytest.importorskip("peft", reason="peft is the reference for adapters (an integration dependency)")
    return transformers, peft


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_pair(tmp_path: Path, ranks: dict[str, int], *, embeddings: bool = False, norms: bool = False,
               ) -> tuple[Path, Path]:
    """A tiny transformers Llama and a fine-tune whose every Linear weight changed by exactly the given ranks."""
    transformers, _ = peft_or_skip()
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,  # type: ignore[attr-defined]
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)  # type: ignore[attr-defined]
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            kind = name.rsplit(".", 2)[-2]
            if kind in ranks:
                param.add_(rank_r(tuple(param.shape), ranks[kind], 100 + i, scale=0.2))
            elif embeddings and kind in ("embed_tokens", "lm_head"):
                param.add_(rank_r(tuple(param.shape), 2, 100 + i, scale=0.2))
            elif norms and param.dim() == 1:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft"


def assert_peft_gives_the_finetune(base: Path, ft: Path, adapter: Path, *, rtol: float = 1e-4) -> None:
    transformers, peft = peft_or_skip()
    ids = torch.arange(12).reshape(1, 12) % 40
    auto = transformers.AutoModelForCausalLM  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = auto.from_pretrained(ft).eval()(ids).logits
        loaded = peft.PeftModel.from_pretrained(auto.from_pretrained(base), adapter).eval()  # type: ignore[attr-defined]
        got = loaded(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < rtol


@pytest.mark.integration
def test_peft_loads_the_adapter_with_the_finetunes_logits(tmp_path: Path) -> None:
    base, ft = llama_pair(tmp_path, {kind: 2 for kind in LINEARS})
    result = extract_lora(str(ft), str(base), tmp_path / "lora", ExtractOptions(rank=2))
    assert len(result.modules) == 2 * len(LINEARS) and result.saved == () and result.left_out == ()
    assert_peft_gives_the_finetune(base, ft, tmp_path / "lora")


@pytest.mark.integration
def test_energy_gives_per_module_ranks_that_peft_loads(tmp_path: Path) -> None:
    ranks = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 3, "gate_proj": 3, "up_proj": 3, "down_proj": 4}
    base, ft = llama_pair(tmp_path, ranks)
    out = tmp_path / "lora"
    extract_lora(str(ft), str(base), out, ExtractOptions(rank=8, energy=0.999999))
    config = json.loads((out / "adapter_config.json").read_text())
    found = {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()}
    assert config["r"] == 3 and config["lora_alpha"] == 3
    part = {kind: "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn" for kind in LINEARS}
    assert found == {f"model.layers.{i}.{part[kind]}.{kind}": r for i in (0, 1) for kind, r in ranks.items() if r != 3}
    assert config["alpha_pattern"] == {k: float(v) for k, v in config["rank_pattern"].items()}
    assert_peft_gives_the_finetune(base, ft, out)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["lora", "save", "skip"])
def test_embeddings_and_norms_as_asked_and_peft_loads_them(tmp_path: Path, mode: str) -> None:
    base, ft = llama_pair(tmp_path, {kind: 2 for kind in LINEARS}, embeddings=True, norms=True)
    norms = "skip" if mode == "skip" else "save"
    out = tmp_path / "lora"
    result = extract_lora(str(ft), str(base), out, ExtractOptions(rank=2, embeddings=mode, norms=norms))  # type: ignore[arg-type]
    adapter, config = tensors(out), json.loads((out / "adapter_config.json").read_text())
    if mode == "lora":
        assert adapter[PEFT_PREFIX + "model.embed_tokens.lora_embedding_A"].shape == (2, 40)
        assert adapter[PEFT_PREFIX + "model.embed_tokens.lora_embedding_B"].shape == (16, 2)
        assert adapter[PEFT_PREFIX + "lm_head.lora_A.weight"].shape == (2, 16)
        assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    if mode == "save":
        assert adapter[PEFT_PREFIX + "model.embed_tokens.weight"].shape == (40, 16)
        assert {"embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    if mode == "skip":
        assert not any("embed" in k or "lm_head" in k or "norm" in k for k in adapter)
        assert config["modules_to_save"] is None
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(result.left_out)
        return  # the fine-tune's embeddings and norms are not in the adapter: its logits are not the fine-tune's
    assert PEFT_PREFIX + "model.norm.weight" in adapter and "model.norm" in result.saved
    assert_peft_gives_the_finetune(base, ft, out)


@pytest.mark.integration
def test_gpt2_conv1d_layers_are_extracted_transposed_and_peft_loads_them(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are stored (in, out): their factors are PEFT's, with fan_in_fan_out."""
    transformers, _ = peft_or_skip()
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)  # type: ignore[attr-defined]
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if name.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc") and param.dim() == 2:
                param.add_(rank_r(tuple(param.shape), 2, 200 + i, scale=0.2))
    model.save_pretrained(tmp_path / "ft")
    result = extract_lora(str(tmp_path / "ft"), str(tmp_path / "base"), tmp_path / "lora", ExtractOptions(rank=2))
    assert len(result.modules) == 8 and max(m.error for m in result.modules) < 1e-5
    adapter = tensors(tmp_path / "lora")
    # c_fc's weight is (16, 64), (in, out): A is (r, in), B is (out, r), as for a Linear (64, 16).
    assert adapter[PEFT_PREFIX + "transformer.h.0.mlp.c_fc.lora_A.weight"].shape == (2, 16)
    assert adapter[PEFT_PREFIX + "transformer.h.0.mlp.c_fc.lora_B.weight"].shape == (64, 2)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_peft_gives_the_finetune(tmp_path / "base", tmp_path / "ft", tmp_path / "lora")


@pytest.mark.gpu
def test_cuda_extraction_matches_the_cpu(tmp_path: Path) -> None:
    base, ft = toy_models(tmp_path, r=3)
    for device in ("cpu", "cuda"):
        extract_lora(str(ft), str(base), tmp_path / device, ExtractOptions(rank=3, device=device))
        extract_lora(str(ft), str(base), tmp_path / f"{device}-fast", ExtractOptions(rank=3, device=device,
                                                                                    fast=True, oversample=2))
    before, after = tensors(base), tensors(ft)
    for out in ("cuda", "cuda-fast"):
        adapter = tensors(tmp_path / out)
        for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
            delta = after[module + ".weight"] - before[module + ".weight"]
            assert (lora_delta(adapter, module) - delta).norm() / delta.norm() < 1e-5
