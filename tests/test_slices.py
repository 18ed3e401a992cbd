"""Slices recipes: layers found from names and config, stacked and merged per layer, bad input refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergekit_like.errors import RecipeError
from mergekit_like.merge.engine import planned_merge, run_merge
from mergekit_like.merge.layers import find_layout, restacked_config
from mergekit_like.merge.options import MergeOptions
from mergekit_like.merge.recipe import parse_recipe
from tests.helpers import write_checkpoint

MODELS = Path(__file__).parent / "data" / "mergekit_golden" / "models" / "f32"
A, B, C = (str(MODELS / n) for n in ("ft1", "ft2", "ft3"))


def stack(*pieces: tuple[str, int, int], method: str = "passthrough", **extra: Any) -> dict[str, Any]:
    return {"merge_method": method, "slices": [{"sources": [{"model": m, "layer_range": [s, e]}]}
                                               for m, s, e in pieces], **extra}


def merged(recipe: dict[str, Any], out: Path, options: MergeOptions | None = None) -> dict[str, torch.Tensor]:
    with planned_merge(parse_recipe(recipe), options) as plan:
        run_merge(plan, out)
    return load_file(out / "model.safetensors")


def problems(recipe: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        with planned_merge(parse_recipe(recipe)):
            pass
    return caught.value.problems


def test_layout_of_a_llama_follows_its_config() -> None:
    names = load_file(Path(A) / "model.safetensors").keys()
    layout = find_layout("a", names, {"num_hidden_layers": 3})
    (layers,) = layout.stacks
    assert (layers.prefix, layers.count, layers.config_key) == ("model.layers", 3, "num_hidden_layers")
    assert layout.before == ("model.embed_tokens.weight",)
    assert set(layout.after) == {"model.norm.weight", "lm_head.weight"}


def test_layout_of_gpt2_names_and_experts_inside_layers() -> None:
    names = [f"transformer.h.{i}.mlp.experts.{e}.w" for i in range(4) for e in range(2)]
    names += ["transformer.wte.weight", "transformer.ln_f.weight"]
    layout = find_layout("g", names, {"n_layer": 4})
    assert [(s.prefix, s.count, s.config_key) for s in layout.stacks] == [("transformer.h", 4, "n_layer")]
    assert layout.stacks[0].suffixes[0] == {"mlp.experts.0.w", "mlp.experts.1.w"}
    assert layout.before == ("transformer.wte.weight",) and layout.after == ("transformer.ln_f.weight",)


def test_a_run_the_config_does_not_count_is_not_a_layer_stack() -> None:
    names = [f"model.layers.{i}.w" for i in range(3)]
    assert find_layout("m", names, {"num_hidden_layers": 4}).stacks == ()
    with pytest.raises(RecipeError, match="no numbered layers found"):
        find_layout("m", names, {"num_hidden_layers": 4}).only_stack()


def test_two_stacks_are_ambiguous_for_top_level_slices() -> None:
    names = [f"{p}.layers.{i}.w" for p in ("encoder", "decoder") for i in range(2)]
    layout = find_layout("t5", names, {"num_layers": 2, "num_decoder_layers": 2})
    with pytest.raises(RecipeError, match=r"several layer stacks \(encoder.layers.N \(2 layers\), "
                                          r"decoder.layers.N \(2 layers\)\); slice each under modules"):
        layout.only_stack()


def test_restacked_config_sets_the_count_and_rebuilds_per_layer_lists() -> None:
    config = {"num_hidden_layers": 3, "layer_types": ["a0", "a1", "a2"], "architectures": ["X", "Y", "Z"]}
    other = {"num_hidden_layers": 3, "layer_types": ["b0", "b1", "b2"]}
    out = restacked_config(config, "num_hidden_layers", [(config, 0), (config, 1), (other, 1), (other, 2)])
    assert out == {"num_hidden_layers": 4, "layer_types": ["a0", "a1", "b1", "b2"], "architectures": ["X", "Y", "Z"]}
    nested = restacked_config({"text_config": {"num_hidden_layers": 2, "w": [1, 2]}}, "text_config.num_hidden_layers",
                              [({"text_config": {"w": [1, 2]}}, 1)])
    assert nested == {"text_config": {"num_hidden_layers": 1, "w": [2]}}


def test_passthrough_stack_renumbers_layers_and_the_config(tmp_path: Path) -> None:
    out = merged(stack((A, 0, 2), (B, 1, 3)), tmp_path / "out")
    a, b = load_file(Path(A) / "model.safetensors"), load_file(Path(B) / "model.safetensors")
    key = "self_attn.q_proj.weight"
    expected = [a[f"model.layers.0.{key}"], a[f"model.layers.1.{key}"], b[f"model.layers.1.{key}"],
                b[f"model.layers.2.{key}"]]
    for i, tensor in enumerate(expected):
        assert torch.equal(out[f"model.layers.{i}.{key}"], tensor)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])  # the last slice's
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_slice_gradient_runs_over_the_slice(tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.0]}},
                                      {"model": B, "layer_range": [0, 3]}]}]}
    out = merged(recipe, tmp_path / "out")
    a, b = load_file(Path(A) / "model.safetensors"), load_file(Path(B) / "model.safetensors")
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(out[name.format(0)], (a[name.format(0)] + b[name.format(0)]) / 2)  # t=0: 1 and 1
    torch.testing.assert_close(out[name.format(1)], (0.5 * a[name.format(1)] + b[name.format(1)]) / 1.5)
    torch.testing.assert_close(out[name.format(2)], b[name.format(2)])  # t=1: A's weight 0


def test_a_slice_beyond_a_models_layers_is_one_line_naming_it() -> None:
    (problem,) = problems(stack((A, 0, 2), (B, 2, 5)))
    assert problem == (f"slices[1].sources[0] ({B}): layer_range [2, 5] goes beyond its 3 layers (0..2)")


@pytest.mark.parametrize("layer_range, expected", [
    ([2, 2], "is empty or negative"), ([3, 1], "is empty or negative"), ([-1, 2], "is empty or negative"),
    ([0], "must be two integers"), (["zero", 2], "must be two integers"), ([0.5, 2], "must be two integers"),
])
def test_empty_or_malformed_ranges_are_refused(layer_range: list[Any], expected: str) -> None:
    recipe = stack((A, 0, 2))
    recipe["slices"][0]["sources"][0]["layer_range"] = layer_range
    with pytest.raises(RecipeError, match=expected):
        parse_recipe(recipe)


def test_sources_of_one_slice_must_give_as_many_layers() -> None:
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 2]}, {"model": B, "layer_range": [0, 3]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]: every source must give the same number of layers"):
        parse_recipe(recipe)


def test_wrong_number_of_models_in_a_slice_names_the_slice() -> None:
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": A, "layer_range": [0, 1]}]},
        {"sources": [{"model": A, "layer_range": [1, 2]}, {"model": B, "layer_range": [1, 2]}]}]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe)
    (problem,) = caught.value.problems
    assert problem.startswith("slices[1]: passthrough takes at most 1 model")


def test_a_slice_base_must_be_one_of_its_sources() -> None:
    recipe = {"merge_method": "slerp", "base_model": C, "parameters": {"t": 0.5},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 3]}, {"model": B, "layer_range": [0, 3]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]: base_model '.*ft3' is not among the slice's sources"):
        parse_recipe(recipe)


def test_sources_with_different_layer_shapes_are_refused_before_reading(tmp_path: Path) -> None:
    wide = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(8, 4) for i in range(2)}
    narrow = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(6, 4) for i in range(2)}
    for name, tensors in (("wide", wide), ("narrow", narrow)):
        write_checkpoint(tmp_path / name, tensors, config={"num_hidden_layers": 2, "model_type": "llama"})
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(tmp_path / "wide"), "layer_range": [0, 2]},
                     {"model": str(tmp_path / "narrow"), "layer_range": [0, 2]}]}]}
    found = problems(recipe)
    assert len(found) == 2 and "shape [6, 4] in" in found[0] and "model.layers.0.mlp.up_proj.weight" in found[0]


def test_models_of_different_architectures_need_allow_crimes(tmp_path: Path) -> None:
    mistral = tmp_path / "mistral"
    shutil.copytree(B, mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    recipe = {"merge_method": "linear", "models": [{"model": A, "parameters": {"weight": 1.0}},
                                                   {"model": str(mistral), "parameters": {"weight": 1.0}}]}
    (problem,) = problems(recipe)
    assert "different architectures" in problem and "MistralForCausalLM" in problem and "--allow-crimes" in problem
    out = merged(recipe, tmp_path / "out", MergeOptions(allow_crimes=True))
    assert len(out) == len(load_file(Path(A) / "model.safetensors"))


def test_written_recipe_of_a_slices_merge_reruns_the_same(tmp_path: Path) -> None:
    recipe = parse_recipe(stack((A, 0, 2), (B, 1, 3), parameters={"scale": 0.5}))
    again = parse_recipe(recipe.to_dict())
    assert again == recipe
    assert recipe.to_dict()["slices"][1] == {"sources": [{"model": B, "layer_range": [1, 3]}]}


def test_a_whole_model_pass_is_refused_with_slices() -> None:
    recipe = {"merge_method": "ties", "base_model": A, "parameters": {"weight": 1.0, "density": 0.5,
                                                                       "trim_scope": "model"},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 3]}, {"model": B, "layer_range": [0, 3]}]}]}
    (problem,) = problems(recipe)
    assert "needs a models: recipe" in problem


def vision_language_model(directory: Path, seed: int) -> Path:
    """A tiny model of three modules: a language model, a vision tower and a projector between them."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    tensors = {"language_model.model.embed_tokens.weight": rand(8, 4), "language_model.model.norm.weight": rand(4),
               "language_model.lm_head.weight": rand(8, 4), "multi_modal_projector.linear.weight": rand(4, 4),
               "multi_modal_projector.linear.bias": rand(4), "vision_tower.embeddings.weight": rand(4, 4)}
    tensors |= {f"language_model.model.layers.{i}.mlp.weight": rand(4, 4) for i in range(3)}
    tensors |= {f"vision_tower.encoder.layers.{i}.attn.weight": rand(4, 4) for i in range(2)}
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"]},
              "vision_config": {"num_hidden_layers": 2}}
    return write_checkpoint(directory, tensors, config=config)


def test_modules_slice_each_module_of_a_multi_module_model(tmp_path: Path) -> None:
    one, two = (str(vision_language_model(tmp_path / n, s)) for n, s in (("one", 1), ("two", 2)))
    recipe = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": one, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": two, "layer_range": [1, 3]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": two, "layer_range": [0, 2]}]}]},
        "multi_modal_projector": {"models": [{"model": one}]}}}
    out = merged(recipe, tmp_path / "out")
    a, b = load_file(Path(one) / "model.safetensors"), load_file(Path(two) / "model.safetensors")
    layer = "language_model.model.layers.{}.mlp.weight"
    assert [torch.equal(out[layer.format(i)], t) for i, t in enumerate(
        [a[layer.format(0)], a[layer.format(1)], b[layer.format(1)], b[layer.format(2)]])] == [True] * 4
    assert torch.equal(out["language_model.lm_head.weight"], b["language_model.lm_head.weight"])
    assert torch.equal(out["multi_modal_projector.linear.bias"], a["multi_modal_projector.linear.bias"])
    assert torch.equal(out["vision_tower.encoder.layers.1.attn.weight"], b["vision_tower.encoder.layers.1.attn.weight"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"] == {"num_hidden_layers": 4, "layer_types": ["a", "b", "b", "c"]}
    assert config["vision_config"] == {"num_hidden_layers": 2}


def test_a_module_left_out_is_refused(tmp_path: Path) -> None:
    one = str(vision_language_model(tmp_path / "one", 1))
    recipe = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": one, "layer_range": [0, 3]}]}]}}}
    (problem,) = problems(recipe)
    assert "also have vision_tower, multi_modal_projector" in problem
    recipe["modules"]["speech"] = {"models": [{"model": one}]}
    assert any("modules.speech: " in p and "has no such module" in p for p in problems(recipe))


def test_a_star_filter_matches_every_tensor_as_in_mergekit(tmp_path: Path) -> None:
    recipe = {"merge_method": "slerp", "base_model": A, "parameters": {"t": [{"filter": "*", "value": 1.0}]},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 3]}, {"model": B, "layer_range": [0, 3]}]}]}
    out = merged(recipe, tmp_path / "out")
    b = load_file(Path(B) / "model.safetensors")
    assert all(torch.equal(out[n], b[n]) for n in b)  # t = 1 everywhere: the other model


def test_a_model_twice_among_a_slices_sources_is_refused() -> None:
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": A, "layer_range": [0, 1]}, {"model": A, "layer_range": [1, 2]}]}]}
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[1\]: '.*ft1' is already a source of this slice"):
        parse_recipe(recipe)


def test_a_misspelt_parameter_of_a_slice_is_an_error() -> None:
    recipe = stack((A, 0, 3), parameters={"scale": 1.0})
    recipe["slices"][0]["parameters"] = {"scael": 2.0}
    with pytest.raises(RecipeError, match=r"slices\[0\]: parameters: unknown parameter 'scael' for passthrough"):
        parse_recipe(recipe)


def test_a_last_slice_with_more_sources_than_the_first_is_refused() -> None:
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": A, "layer_range": [0, 1]}]},
        {"sources": [{"model": A, "layer_range": [1, 3]}, {"model": B, "layer_range": [1, 3]}]}]}
    (problem,) = problems(recipe)
    assert "slices[1] has 2 sources and slices[0] 1" in problem and "final norm and head" in problem


def test_a_whole_model_pass_in_a_slices_own_method_is_refused() -> None:
    recipe = {"merge_method": "linear", "base_model": A, "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": A, "layer_range": [0, 3]}, {"model": B, "layer_range": [0, 3]}],
         "merge_method": "ties", "parameters": {"density": 0.5, "trim_scope": "model"}}]}
    (problem,) = problems(recipe)
    assert "ties's whole-model pass needs a models: recipe" in problem


def test_a_module_merged_whole_reads_its_unlisted_base(tmp_path: Path) -> None:
    base, one = (str(vision_language_model(tmp_path / n, s)) for n, s in (("base", 0), ("one", 1)))
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 0.5}, "modules": {
        name: {"models": [{"model": one}]} for name in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    out = merged(recipe, tmp_path / "out")
    b, o = load_file(Path(base) / "model.safetensors"), load_file(Path(one) / "model.safetensors")
    name = "vision_tower.encoder.layers.1.attn.weight"
    torch.testing.assert_close(out[name], b[name] + 0.5 * (o[name] - b[name]))
