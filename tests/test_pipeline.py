"""The pipelined engine: same bytes as the one-item-at-a-time path; any stage's failure ends all."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers import base_and_two_recipe as _recipe
from helpers import split_merge_kwargs, write_checkpoint

import mergekit_like.merge.engine as engine
import mergekit_like.methods.task_vectors as task_vectors
from mergekit_like.errors import DeviceError, MergeError, OutputWriteError
from mergekit_like.io import open_checkpoint
from mergekit_like.io.reader import Checkpoint
from mergekit_like.io.writer import ShardedWriter
from mergekit_like.merge.engine import planned_merge, run_merge

METHODS = [
    ("linear", ["weight=0.3,0.7"]),
    ("task_arithmetic", ["weight=0.5,1.0"]),
    ("ties", ["density=0.5", "weight=1.0,0.4"]),
    ("dare_ties", ["density=0.6", "weight=1.0"]),
    ("slerp", ["t=0.3"]),
]


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(11)
    paths = []
    for name in ("base", "a", "b"):
        tensors = {f"model.layers.{i}.w": torch.randn(32, 16, generator=g).to(torch.bfloat16) for i in range(4)}
        tensors["embed"] = torch.randn(64, 16, generator=g).to(torch.bfloat16)
        tensors["steps"] = torch.arange(3)
        paths.append(write_checkpoint(tmp_path / name, tensors, max_shard_size=3000))
    return paths


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def _merge(recipe, out: Path, **kwargs) -> Path:
    options, run = split_merge_kwargs(kwargs)
    with planned_merge(recipe, options) as plan:
        run_merge(plan, out, **run)
    return out


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("reader", "read_", "writer", "kernel"))]


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_pipelined_and_sequential_paths_write_the_same_bytes(
    models: list[Path], tmp_path: Path, method: str, params: list[str]
) -> None:
    recipe = _recipe(models, method, params)
    sequential = _read_all(_merge(recipe, tmp_path / "sequential", pipeline=False))
    pipelined = _read_all(_merge(recipe, tmp_path / "pipelined"))
    assert sequential.keys() == pipelined.keys()
    assert all(torch.equal(sequential[n], pipelined[n]) for n in sequential)
    assert (tmp_path / "sequential" / "checksums.sha256").read_text() == (
        tmp_path / "pipelined" / "checksums.sha256").read_text()


def _fail_on_call(number: int, error: BaseException):
    calls = [0]

    def maybe_fail() -> None:
        calls[0] += 1
        if calls[0] == number:
            raise error

    return maybe_fail


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_a_failure_in_any_stage_stops_the_others_and_leaves_nothing(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    recipe = _recipe(models, "task_arithmetic", ["weight=0.5,1.0"])
    error = {"read": OSError("disk read failed"), "compute": MergeError("kernel failed"),
             "write": OutputWriteError("disk write failed")}[stage]
    fail = _fail_on_call(4, error)
    if stage == "read":
        real_read = Checkpoint.read

        def read(self, *args, **kwargs):
            fail()
            return real_read(self, *args, **kwargs)

        monkeypatch.setattr(Checkpoint, "read", read)
    elif stage == "compute":
        real_compute = engine.compute

        def compute(*args, **kwargs):
            fail()
            return real_compute(*args, **kwargs)

        monkeypatch.setattr(engine, "compute", compute)
    else:
        real_write = ShardedWriter.write

        def write(self, *args, **kwargs):
            fail()
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(ShardedWriter, "write", write)
    with pytest.raises(type(error)):
        _merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert _engine_threads() == []


def test_the_kernel_thread_pool_lives_only_as_long_as_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tensors big enough that TIES makes each model's mask in a thread of the merge's pool.
    g = torch.Generator().manual_seed(3)
    paths = [write_checkpoint(tmp_path / name, {"w": torch.randn(256, 512, generator=g)})
             for name in ("base", "a", "b")]
    threads: list[str] = []
    real = task_vectors.make_trim

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(task_vectors, "make_trim", recording)
    _merge(_recipe(paths, "ties", ["density=0.5", "weight=1,1"]), tmp_path / "out")
    assert len(threads) == 2 and all(name.startswith("kernel") for name in threads), threads
    assert _engine_threads() == []


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", "cpu:1"])  # not "gpu": a gpu keyword marks CUDA tests
def test_a_device_the_tool_cannot_merge_on_is_a_clear_error(device: str) -> None:
    with pytest.raises(DeviceError, match=f"'{device}' is not a device this tool merges on"):
        engine.resolve_device(device)
    assert engine.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("method", "params"), [m for m in METHODS if m[0] not in ("linear", "slerp")])
def test_models_handed_over_as_stored_merge_as_if_cast_first(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: list[str]
) -> None:
    recipe = _recipe(models, method, params)
    seen: list[torch.dtype] = []
    real_compute = engine.compute

    def compute(plan, inputs, *args, **kwargs):
        if inputs.base is not None:
            seen.extend(x.dtype for x in inputs.models)
        return real_compute(plan, inputs, *args, **kwargs)

    monkeypatch.setattr(engine, "compute", compute)
    as_stored = _read_all(_merge(recipe, tmp_path / "as_stored"))
    assert set(seen) == {torch.bfloat16}  # bf16 models, float32 compute: no cast
    monkeypatch.setattr(engine, "EXACT_WIDENINGS", frozenset())
    seen.clear()
    cast_first = _read_all(_merge(recipe, tmp_path / "cast_first"))
    assert set(seen) == {torch.float32}
    assert all(torch.equal(as_stored[n], cast_first[n]) for n in as_stored)
