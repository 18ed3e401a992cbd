"""update_bn: the same BatchNorm statistics as torch's swa_utils.update_bn, loading an average, refusals."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.utils.data import DataLoader, TensorDataset

from mergekit_like.averaging.batchnorm import RECOMPUTED_BUFFERS, update_bn
from mergekit_like.errors import IncompatibleModelsError, OptionsError

M = TypeVar("M", bound=nn.Module)


def stale(model: M) -> M:
    """Gives every BatchNorm statistics unrelated to the data, as an average of weights has."""
    generator = torch.Generator().manual_seed(99)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(7)  # type: ignore[union-attr,operator]
    return model.eval()


def conv2d_net(seed: int = 0) -> nn.Sequential:
    """BatchNorm2d with its own momentum, then a BatchNorm1d with momentum None and no affine."""
    torch.manual_seed(seed)
    return stale(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8, momentum=None, affine=False), nn.ReLU(), nn.Linear(8, 2),
    ))


def conv1d_net(seed: int = 0) -> nn.Sequential:
    """BatchNorm1d over (batch, channels, length), and one that keeps no running statistics."""
    torch.manual_seed(seed)
    return stale(nn.Sequential(
        nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Conv1d(5, 2, 1),
        nn.BatchNorm1d(2, track_running_stats=False),
    ))


NETS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "conv2d": (conv2d_net, (3, 6, 6)),
    "conv1d": (conv1d_net, (3, 9)),
}


def inputs(sample_shape: tuple[int, ...], sizes: tuple[int, ...] = (6, 6, 6, 3)) -> list[Tensor]:
    """Batches of non-zero mean and non-unit variance; the last one smaller, as a DataLoader's last."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn((size, *sample_shape), generator=generator) * 2 + 1 for size in sizes]


def as_batches(tensors: list[Tensor], form: str) -> list[Any] | DataLoader[Any]:
    targets = [torch.zeros(len(x), dtype=torch.long) for x in tensors]
    if form == "tensor":
        return tensors
    if form == "tuple":
        return list(zip(tensors, targets))
    if form == "list":
        return [[x, y] for x, y in zip(tensors, targets)]
    dataset = TensorDataset(torch.cat(tensors), torch.cat(targets))  # yields [input, target] lists
    return DataLoader(dataset, batch_size=len(tensors[0]))


def torch_reference(model: M, tensors: list[Tensor]) -> M:
    reference = copy.deepcopy(model)
    torch_update_bn(tensors, reference)
    return reference


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(actual_state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert actual_state[name].dtype == tensor.dtype, name
        assert torch.equal(actual_state[name], tensor), name
    assert actual.training == expected.training
    assert momenta(actual) == momenta(expected)


def momenta(model: nn.Module) -> list[float | None]:
    return [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS}


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dataloader"])
def test_statistics_equal_torch_update_bn(net: str, form: str) -> None:
    build, sample_shape = NETS[net]
    model = build()
    tensors = inputs(sample_shape)
    expected = torch_reference(model, tensors)
    stale_state = batchnorm_state(model)

    result = update_bn(model, as_batches(tensors, form))

    assert result is model
    assert_same_state(model, expected)
    assert any(not torch.equal(stale_state[k], v) for k, v in batchnorm_state(model).items())


def test_dict_batches_are_keyword_arguments_and_move_to_device() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net: nn.Sequential = conv2d_net()

        def forward(self, pixels: Tensor, scale: float) -> Tensor:
            return self.net(pixels * scale)

    model = stale(Keyword())
    tensors = inputs((3, 6, 6))
    expected = torch_reference(model.net, [x * 0.5 for x in tensors])

    update_bn(model, [{"pixels": x, "scale": 0.5} for x in tensors], device="cpu")

    assert_same_state(model.net, expected)


def test_training_mode_and_momentum_are_restored() -> None:
    model = conv2d_net().train()
    update_bn(model, inputs((3, 6, 6)))
    assert model.training
    assert momenta(model) == [0.3, None]
    model.eval()
    update_bn(model, inputs((3, 6, 6)))
    assert not model.training and not any(m.training for m in model.modules())
    assert momenta(model) == [0.3, None]


def test_max_batches_stops_reading_the_loader() -> None:
    model = conv2d_net()
    tensors = inputs((3, 6, 6), sizes=(4, 4, 4, 4, 4))
    pulled: list[Tensor] = []

    def loader() -> Iterator[Tensor]:
        for x in tensors:
            pulled.append(x)
            yield x

    expected = torch_reference(model, tensors[:2])
    update_bn(model, loader(), max_batches=2)

    assert len(pulled) == 2
    assert_same_state(model, expected)
    assert int(model.state_dict()["1.num_batches_tracked"]) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_batches_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(OptionsError, match="max_batches"):
        update_bn(conv2d_net(), inputs((3, 6, 6)), max_batches=bad)


def test_model_without_batchnorm_returns_without_reading_the_loader() -> None:
    class Unreadable:
        def __iter__(self) -> Iterator[Tensor]:
            raise AssertionError("the loader was read")

    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).eval()
    assert update_bn(model, Unreadable()) is model
    assert not model.training


def test_empty_loader_is_refused_and_leaves_the_statistics() -> None:
    model = conv2d_net()
    before = batchnorm_state(model)
    with pytest.raises(OptionsError, match="no batches"):
        update_bn(model, [])
    assert all(torch.equal(before[k], v) for k, v in batchnorm_state(model).items())
    assert not model.training and momenta(model) == [0.3, None]


def test_failing_batch_puts_the_statistics_back() -> None:
    model = conv2d_net()
    before = batchnorm_state(model)
    good = inputs((3, 6, 6))[0]
    with pytest.raises(RuntimeError):
        update_bn(model, [good, torch.zeros(2, 5, 6, 6)])  # 5 channels where the conv takes 3
    assert all(torch.equal(before[k], v) for k, v in batchnorm_state(model).items())
    assert not model.training and momenta(model) == [0.3, None]


def test_empty_tuple_batch_is_refused() -> None:
    with pytest.raises(OptionsError, match="batch 2 is an empty tuple"):
        update_bn(conv2d_net(), [(inputs((3, 6, 6))[0],), ()])


# -- loading the average -------------------------------------------------------------------------

def average_state(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Another seed's weights in another dtype, standing for an average of checkpoints."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in conv2d_net(seed=1).state_dict().items()}


def loaded_reference(average: dict[str, Tensor], tensors: list[Tensor]) -> nn.Sequential:
    reference = conv2d_net()
    reference.load_state_dict(average, strict=False)  # copies with a cast, as update_bn must
    return torch_reference(reference, tensors)


def test_average_state_dict_is_loaded_cast_then_refreshed() -> None:
    average = average_state()
    tensors = inputs((3, 6, 6))
    expected = loaded_reference(average, tensors)
    model = conv2d_net()

    update_bn(model, tensors, average=average)

    assert_same_state(model, expected)
    assert torch.equal(model.state_dict()["0.weight"], average["0.weight"].float())
    assert model[0].weight.dtype == torch.float32


def test_average_may_leave_out_the_recomputed_statistics() -> None:
    average = {k: v for k, v in average_state().items() if k.rsplit(".", 1)[-1] not in RECOMPUTED_BUFFERS}
    tensors = inputs((3, 6, 6))
    expected = loaded_reference(average, tensors)
    model = conv2d_net()
    update_bn(model, tensors, average=average)
    assert_same_state(model, expected)


@pytest.mark.parametrize("point_at", ["directory", "file"])
def test_average_checkpoint_is_read_from_safetensors(tmp_path: Path, point_at: str) -> None:
    average = average_state(torch.bfloat16)
    save_file(average, tmp_path / "model.safetensors")
    tensors = inputs((3, 6, 6))
    expected = loaded_reference(average, tensors)
    model = conv2d_net()

    update_bn(model, tensors, average=tmp_path if point_at == "directory" else str(tmp_path / "model.safetensors"))

    assert_same_state(model, expected)


def test_tied_tensor_needs_only_one_name() -> None:
    torch.manual_seed(0)
    model = stale(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)))
    model[2].weight = model[0].weight
    average = {k: torch.full_like(v, 0.25) for k, v in model.state_dict().items() if k != "2.weight"}
    update_bn(model, [torch.randn(5, 4)], average=average)
    assert torch.equal(model.state_dict()["2.weight"], torch.full((4, 4), 0.25))


def test_average_missing_a_tensor_is_refused_before_loading() -> None:
    average = average_state()
    del average["4.weight"]
    model = conv2d_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleModelsError, match=r"tensor '4\.weight': is in the model but missing"):
        update_bn(model, inputs((3, 6, 6)), average=average)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_missing_a_tensor_names_the_file(tmp_path: Path) -> None:
    average = average_state(torch.float32)
    del average["0.bias"]
    del average["7.bias"]
    save_file(average, tmp_path / "model.safetensors")
    with pytest.raises(IncompatibleModelsError) as refused:
        update_bn(conv2d_net(), inputs((3, 6, 6)), average=tmp_path)
    message = str(refused.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "'0.bias'" in message and "(and 1 more)" in message


def test_average_naming_an_unknown_tensor_is_refused(tmp_path: Path) -> None:
    average = {**average_state(torch.float32), "head.weight": torch.zeros(2, 2)}
    save_file(average, tmp_path / "model.safetensors")
    with pytest.raises(IncompatibleModelsError, match=r"tensor 'head\.weight': is in the average but not in"):
        update_bn(conv2d_net(), inputs((3, 6, 6)), average=tmp_path)


def test_average_of_another_shape_is_refused() -> None:
    average = {**average_state(), "7.weight": torch.zeros(3, 8)}
    with pytest.raises(IncompatibleModelsError, match=r"tensor '7\.weight': has shape \[3, 8\] in the average"):
        update_bn(conv2d_net(), inputs((3, 6, 6)), average=average)


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_statistics_equal_torch_update_bn() -> None:
    model = conv2d_net().cuda()
    tensors = inputs((3, 6, 6))
    reference = copy.deepcopy(model)
    torch_update_bn(tensors, reference, device=torch.device("cuda"))
    update_bn(model, list(zip(tensors, tensors)), device="cuda")
    assert_same_state(model, reference)
