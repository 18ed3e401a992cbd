"""The training-framework adapters (skipped when the framework is absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_like.hook import EMA
from mergekit_like.io import open_checkpoint


def lightning() -> Any:
    """lightning.pytorch, or the older pytorch_lightning (the test is skipped without either)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def test_hf_trainer_callback_writes_averages(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mergekit_like.hook.adapters import hf_trainer_callback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4,
                                          per_device_train_batch_size=2, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    callback = hf_trainer_callback([EMA(0.9)], out_dir=tmp_path / "avg", strict=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.averaging.counts.taken == 4
    latest = tmp_path / "avg" / "ema_0.9" / "latest"
    with open_checkpoint(latest) as ckpt:
        assert "model.embed_tokens.weight" in ckpt
    assert (latest / "config.json").exists()  # ready to load with from_pretrained
    loaded = transformers.AutoModelForCausalLM.from_pretrained(latest)
    assert loaded.config.hidden_size == 16


def test_lightning_callback_writes_averages(tmp_path: Path) -> None:
    pl = lightning()
    from mergekit_like.hook.adapters import lightning_callback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, _index):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    callback = lightning_callback([EMA(0.9)], out_dir=tmp_path / "avg", strict=True)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[callback])
    trainer.fit(Tiny(), data)
    assert callback.averaging.counts.taken == 4
    assert (tmp_path / "avg" / "ema_0.9" / "latest").exists()


def tiny_llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def test_a_lightning_module_holding_a_hugging_face_model_is_averaged_under_its_names(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pl = lightning()
    from mergekit_like.hook.adapters import lightning_callback

    class Wrapper(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()
            self.loss = torch.nn.CrossEntropyLoss()  # a child without tensors does not count

        def training_step(self, batch, _index):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    callback = lightning_callback([EMA(0.9)], out_dir=tmp_path / "avg", strict=True)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[callback])
    module = Wrapper()
    trainer.fit(module, data)
    latest = tmp_path / "avg" / "ema_0.9" / "latest"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(latest)  # names and config.json of the inner model
    with open_checkpoint(latest) as ckpt:
        assert sorted(ckpt.names()) == sorted(module.model.state_dict())
    assert loaded.config.hidden_size == 16


def test_a_compiled_model_is_averaged_under_the_names_of_the_model_inside(tmp_path: Path) -> None:
    from mergekit_like.hook import WeightAveraging

    model = tiny_llama()
    compiled = torch.compile(model, backend="eager")  # no C++ compiler needed; the wrapper is the same
    assert all(name.startswith("_orig_mod.") for name in compiled.state_dict())
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with WeightAveraging(compiled, [EMA(0.9)], out_dir=tmp_path / "avg", strict=True) as hook:
        for _ in range(2):
            optimizer.zero_grad()
            compiled(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            hook.step()
        average = hook.averaged_state_dict("ema_0.9")
        with hook.swapped_in("ema_0.9"):  # the swap writes the wrapped model's own tensors
            assert torch.equal(compiled.state_dict()["_orig_mod.lm_head.weight"], average["lm_head.weight"])
    latest = tmp_path / "avg" / "ema_0.9" / "latest"
    assert (latest / "config.json").exists()
    with open_checkpoint(latest) as ckpt:
        assert sorted(ckpt.names()) == sorted(model.state_dict())


def test_only_the_wrappers_of_training_are_looked_through() -> None:
    from mergekit_like.hook.tensors import inner_model

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # a user's model with one child: its own names
    assert inner_model(plain) is plain
    assert inner_model(torch.nn.DataParallel(plain)) is plain
    llama = tiny_llama()
    assert inner_model(llama) is llama  # a Hugging Face model has a config: never descended into

    class TwoModels(torch.nn.Module):  # a teacher and a student: which one is "the model" is not ours to guess
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = tiny_llama(), tiny_llama()

    both = TwoModels()
    assert inner_model(both) is both

    class WithHead(torch.nn.Module):  # tensors of its own beside the Hugging Face child
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()
            self.value_head = torch.nn.Parameter(torch.zeros(16))

    headed = WithHead()
    assert inner_model(headed) is headed
