"""A model whose tensors are replaced during training: the hook averages the current ones, or refuses clearly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergekit_like.errors import HookUsageError
from mergekit_like.hook import SWA, WeightAveraging

FIVE = 5.0


def tiny_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))


def assign_data(model: torch.nn.Sequential) -> None:
    model[0].weight.data = torch.full((2, 3), FIVE)  # the Parameter stays, its tensor is new


def new_parameter(model: torch.nn.Sequential) -> None:
    model[0].weight = torch.nn.Parameter(torch.full((2, 3), FIVE))  # as a new lm_head would


def new_module(model: torch.nn.Sequential) -> None:
    model[0] = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model[0].weight.fill_(FIVE)


def load_with_assign(model: torch.nn.Sequential) -> None:
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["0.weight"].fill_(FIVE)
    model.load_state_dict(state, assign=True)  # every tensor is a new one


@pytest.mark.parametrize("replace", [assign_data, new_parameter, new_module, load_with_assign],
                         ids=lambda replace: replace.__name__)
def test_a_replaced_tensor_of_the_same_shape_is_averaged_from_then_on(
        tmp_path: Path, replace: Callable[[torch.nn.Sequential], None]) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)
    first = model[0].weight.detach().clone()
    hook.step()
    replace(model)
    for _ in range(3):
        hook.step()
    swa = hook.averaged_state_dict("swa")
    hook.close()
    torch.testing.assert_close(swa["0.weight"], (first + 3 * FIVE) / 4)
    torch.testing.assert_close(swa["1.weight"], model[1].weight.detach())  # untouched tensors as ever


def test_a_resized_parameter_is_refused_naming_it_and_both_shapes(tmp_path: Path) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)
    hook.step()
    model[0].weight = torch.nn.Parameter(torch.zeros(4, 3))  # as resize_token_embeddings does
    with pytest.raises(HookUsageError, match=r"'0\.weight' changed its shape from \(2, 3\) to \(4, 3\)") as caught:
        hook.step()
    assert "\n" not in str(caught.value)
    hook.close()


def test_a_parameter_of_another_dtype_is_refused_naming_it(tmp_path: Path) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)
    hook.step()
    model.to(torch.float64)
    with pytest.raises(HookUsageError, match=r"'0\.weight' changed its dtype from torch\.float32 to torch\.float64"):
        hook.step()
    hook.close()


def test_a_tensor_added_to_the_model_is_refused_naming_it(tmp_path: Path) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)
    hook.step()
    model.append(torch.nn.Linear(2, 1))
    with pytest.raises(HookUsageError, match=r"new: '2\.bias', '2\.weight'"):
        hook.step()
    hook.close()


def test_the_check_runs_only_on_snapshot_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", snapshot_every=4, strict=True)
    looked = []
    original = model.state_dict

    def counted(*args: object, **kwargs: object) -> object:
        looked.append(hook.step_count)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "state_dict", counted)
    for _ in range(8):
        hook.step()
    hook.close()
    assert looked == [4, 8]
