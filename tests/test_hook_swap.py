"""Evaluating with an average: ``WeightAveraging.swapped_in`` and the adapters' ``evaluate_with``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_like.errors import HookUsageError, UnknownAverageError
from mergekit_like.hook import EMA, WeightAveraging
from mergekit_like.hook import tensors as hook_tensors
from mergekit_like.hook import weight_averaging as hook_module

LABEL = "ema_0.5"


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)).to(dtype)


def train(model: torch.nn.Module, hook: WeightAveraging, steps: int = 3) -> None:
    """Random updates and a forward pass (which moves the BatchNorm statistics) before each step()."""
    g = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
            model.train()
            model(torch.randn(4, 6, generator=g).to(dtype))
        hook.step()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_identical(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == expected.keys()
    for name, value in expected.items():
        assert now[name].dtype == value.dtype and torch.equal(now[name], value), name


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def trained(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[torch.nn.Module, WeightAveraging]]:
    """A model and its hook after three steps, shared by the tests of one dtype (a sidecar takes a second to start)."""
    model = tiny_model(request.param)
    hook = WeightAveraging(model, [EMA(0.5)], out_dir=tmp_path_factory.mktemp("avg"), strict=True)
    assert hook.wait_until_ready()
    train(model, hook)
    yield model, hook
    hook.close()


def test_the_block_sees_the_average_in_the_models_dtype_and_the_exact_weights_come_back(
        trained: tuple[torch.nn.Module, WeightAveraging], monkeypatch: pytest.MonkeyPatch) -> None:
    model, hook = trained
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", 4)  # several chunks per tensor
    with torch.no_grad():  # counts a batch the average has not seen: num_batches_tracked differs from its own
        model.train()
        model(torch.randn(4, 6).to(next(model.parameters()).dtype))
    before = weights(model)
    average = hook.averaged_state_dict(LABEL)
    assert not torch.equal(average["1.num_batches_tracked"], before["1.num_batches_tracked"])
    with hook.swapped_in(LABEL):
        inside = model.state_dict()
        for name, value in inside.items():
            if value.is_floating_point():
                assert torch.equal(value, average[name].to(value.dtype)), name
            else:  # num_batches_tracked keeps the training value
                assert torch.equal(value, before[name]), name
        assert not torch.equal(inside["0.weight"], before["0.weight"])  # the average differs from the weights
    assert_identical(model, before)


def test_the_weights_come_back_when_the_block_raises(trained: tuple[torch.nn.Module, WeightAveraging]) -> None:
    model, hook = trained
    before = weights(model)
    with pytest.raises(ZeroDivisionError), hook.swapped_in(LABEL):
        assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
        _ = 1 / 0
    assert_identical(model, before)
    taken = hook.counts.taken
    train(model, hook, steps=1)  # the hook goes on as before
    assert hook.counts.taken == taken + 1


def test_nesting_and_step_inside_are_refused_and_change_nothing(
        trained: tuple[torch.nn.Module, WeightAveraging]) -> None:
    model, hook = trained
    before, steps = weights(model), hook.step_count
    with hook.swapped_in(LABEL):
        swapped = weights(model)
        with pytest.raises(HookUsageError, match="inside swapped_in"), hook.swapped_in(LABEL):
            pass
        with pytest.raises(HookUsageError, match=r"step\(\) inside swapped_in"):
            hook.step()
        assert_identical(model, swapped)
    assert hook.step_count == steps
    assert_identical(model, before)


def test_an_unknown_label_is_refused(trained: tuple[torch.nn.Module, WeightAveraging]) -> None:
    model, hook = trained
    before = weights(model)
    with pytest.raises(UnknownAverageError, match=r"this hook keeps: ema_0\.5"), hook.swapped_in("ema_0.9"):
        pass
    assert_identical(model, before)


def test_a_process_without_a_sidecar_refuses_the_swap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hook_module, "_rank", lambda: 1)  # a DDP rank other than 0
    hook = WeightAveraging(tiny_model(), [EMA(0.5)], out_dir=tmp_path / "avg")
    with pytest.raises(HookUsageError, match="rank 0"), hook.swapped_in(LABEL):
        pass
    hook.close()


def test_a_channels_last_convolution_is_swapped_and_restored_and_close_ends_swaps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    assert not model.weight.is_contiguous()
    hook = WeightAveraging(model, [EMA(0.5)], out_dir=tmp_path / "avg", strict=True)
    assert hook.wait_until_ready()
    hook.step()
    with torch.no_grad():
        model.weight.add_(1.0)
    hook.step()
    before = weights(model)
    average = hook.averaged_state_dict(LABEL)
    with hook.swapped_in(LABEL):
        assert torch.equal(model.weight, average["weight"])
    assert_identical(model, before)
    assert not model.weight.is_contiguous()  # the layout is the model's own, before and after
    hook.close()
    with pytest.raises(HookUsageError, match="after close"), hook.swapped_in(LABEL):
        pass
    assert_identical(model, before)


@pytest.mark.gpu
def test_a_bf16_cuda_model_takes_the_float32_average_in_chunks(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    chunk = 1 << 20
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", chunk)
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096, bias=False).to("cuda", torch.bfloat16)
    hook = WeightAveraging(model, [EMA(0.5)], out_dir=tmp_path / "avg", strict=True)
    assert hook.wait_until_ready()
    hook.step()
    with torch.no_grad():
        model.weight.add_(1.0)
    hook.step()
    before = weights(model)
    average = hook.averaged_state_dict(LABEL)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with hook.swapped_in(LABEL):
        scratch = torch.cuda.max_memory_allocated() - start
        assert torch.equal(model.weight, average["weight"].to(torch.bfloat16).cuda())
    assert scratch <= 2 * 4 * chunk  # a float32 chunk or two, not the 64 MiB float32 copy of the weight
    assert_identical(model, before)
    hook.close()


def test_the_adapters_refuse_evaluate_with_at_the_start_of_training(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from mergekit_like.hook.adapters import hf_trainer_callback

    monkeypatch.setattr(hook_module, "_rank", lambda: 1)  # a DDP rank other than 0: no sidecar to start
    unknown = hf_trainer_callback([EMA(0.5)], evaluate_with="ema_0.9", out_dir=tmp_path / "avg")
    with pytest.raises(UnknownAverageError, match=r"evaluate_with='ema_0\.9'"):
        unknown.on_train_begin(None, None, None, model=tiny_model())
    ddp = hf_trainer_callback([EMA(0.5)], evaluate_with=LABEL, out_dir=tmp_path / "avg")
    with pytest.raises(HookUsageError, match="only rank 0"):
        ddp.on_train_begin(None, None, None, model=tiny_model())


def test_hf_callback_restores_when_an_announced_evaluation_never_ran_and_warns_about_a_second_one(
        trained: tuple[torch.nn.Module, WeightAveraging]) -> None:
    transformers = pytest.importorskip("transformers")
    from mergekit_like.hook.adapters import hf_trainer_callback

    model, hook = trained
    callback = hf_trainer_callback([EMA(0.5)], evaluate_with=LABEL)
    callback.averaging, callback._training = hook, True  # the hook of on_train_begin, without its sidecar start
    control = transformers.TrainerControl(should_evaluate=True)
    training = weights(model)
    callback.on_step_end(None, None, control)
    assert not torch.equal(model.state_dict()["0.weight"], training["0.weight"])  # swapped in
    callback.on_step_begin(None, None, control)  # no on_evaluate came: the training weights are back
    assert_identical(model, training)
    callback.on_step_end(None, None, control)
    callback.on_evaluate(None, None, control, metrics={})  # the first of two evaluation datasets
    with pytest.warns(UserWarning, match="ran with the training weights"):
        callback.on_evaluate(None, None, control, metrics={})  # the second: nothing is swapped in
    assert_identical(model, training)


class _Seen:
    """What a test callback saw: the training weights before each evaluation, the weights during it."""

    def __init__(self) -> None:
        self.training: list[dict[str, torch.Tensor]] = []
        self.evaluated: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []


def test_hf_trainer_evaluates_with_the_average_and_trains_on_the_exact_weights(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mergekit_like.hook.adapters import hf_trainer_callback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, learning_rate=1e-2,
                                          per_device_train_batch_size=2, per_device_eval_batch_size=4,
                                          eval_strategy="steps", eval_steps=2, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    callback = hf_trainer_callback([EMA(0.5)], evaluate_with=LABEL, out_dir=tmp_path / "avg", strict=True)
    seen = _Seen()

    class Recorder(transformers.TrainerCallback):  # runs before the averaging callback in every event
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if seen.training:  # the model trains on the weights it had before the evaluation
                assert_identical(model, seen.training[-1])

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            seen.training.append(weights(model))

        def on_prediction_step(self, args: Any, state: Any, control: Any, model: Any = None,
                               **kwargs: Any) -> None:
            seen.evaluated.append((weights(model), callback.averaging.averaged_state_dict(LABEL)))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                                   callbacks=[Recorder(), callback])
    trainer.train()
    assert len(seen.evaluated) == 2 and len(seen.training) == 4  # after steps 2 and 4, one batch each
    for (during, average), training in zip(seen.evaluated, [seen.training[1], seen.training[3]], strict=True):
        for name, value in during.items():
            assert torch.equal(value, average[name].to(value.dtype)), name
        assert not torch.equal(during["model.embed_tokens.weight"], training["model.embed_tokens.weight"])
    assert_identical(model, seen.training[-1])


def test_lightning_validates_with_the_average_and_trains_on_the_exact_weights(tmp_path: Path) -> None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from mergekit_like.hook.adapters import lightning_callback

    callback = lightning_callback([EMA(0.5)], evaluate_with=LABEL, out_dir=tmp_path / "avg", strict=True)
    seen = _Seen()

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], _index: int) -> torch.Tensor:
            if seen.training:
                assert_identical(self, seen.training[-1])
            return self.layer(batch[0]).square().mean()

        def on_train_batch_end(self, *args: Any) -> None:  # after the optimizer step, before the callbacks'
            seen.training.append(weights(self))

        def validation_step(self, batch: list[torch.Tensor], _index: int) -> None:
            if not self.trainer.sanity_checking:  # the sanity check runs before any snapshot
                seen.evaluated.append((weights(self), callback.averaging.averaged_state_dict(LABEL)))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                         limit_val_batches=1, callbacks=[callback])
    module = Tiny()
    trainer.fit(module, data, data)
    assert len(seen.evaluated) == 2 and len(seen.training) == 4
    for during, average in seen.evaluated:
        for name, value in during.items():
            assert torch.equal(value, average[name].to(value.dtype)), name
        assert not torch.equal(during["layer.weight"], seen.training[1]["layer.weight"])
    assert_identical(module, seen.training[-1])
