from __future__ import annotations

import os
from pathlib import Path

import pytest

# The mergekit goldens were made on another CPU. MKL picks its kernels (for float32 dot products,
# used by the spherical methods) by the CPU it runs on, so their last bits differ between machines
# (mergekit's as ours); its conditional-reproducibility mode gives every machine the same ones.
# Set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from mergekit_like.example import write_example  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def kept_memory_calls(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Records merges' calls to keep_freed_memory instead of changing this process's allocator."""
    calls: list[None] = []
    monkeypatch.setattr("mergekit_like.memory.keep_freed_memory", lambda: calls.append(None) or True)
    monkeypatch.setattr("mergekit_like.memory.return_freed_tensors_to_the_os", lambda: True)
    return calls


@pytest.fixture(scope="session", autouse=True)
def sort_replay_checked() -> bool:
    """The replay's one check of this torch's sort, made before any test patches the sort or the replay
    (its answer is cached for the process)."""
    from mergekit_like.methods.sort_replay import replays_this_sort

    return replays_this_sort()


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """base, finetune-1..3 of the tiny Llama-style example (bf16, sharded)."""
    return write_example(tmp_path_factory.mktemp("example") / "models")


@pytest.fixture(scope="session")
def example_models_f32(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_example(tmp_path_factory.mktemp("example32") / "models", dtype=torch.float32)
