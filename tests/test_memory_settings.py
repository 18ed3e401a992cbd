"""The process-wide allocator settings: glibc accepts them (on Linux with glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("setting", ["share_one_malloc_arena", "return_freed_tensors_to_the_os", "keep_freed_memory"])
def test_glibc_accepts_the_setting(setting: str) -> None:
    # In a child: the settings are process-wide and must not leak into the test run.
    code = f"from mergekit_like.memory import {setting}; print({setting}())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


STREAM_FAULTS = """
import resource, sys, torch
from mergekit_like.memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def stream(n):  # a reader's buffer and the float32 copy a merge makes of it, tensor after tensor
    for i in range(n):
        raw = torch.empty((20 << 20) + (i % 3 << 20), dtype=torch.bfloat16).fill_(1)
        widened = raw.float()
        del raw, widened
stream(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
stream(30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_kept_memory_serves_later_tensors_without_page_faults() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", STREAM_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    # Tensors of 40 to 88 MiB: over glibc's largest mmap threshold, so by default each is a
    # fresh mapping, a fault per page; kept, they come from memory freed by earlier ones.
    # (Seen: 967,740 by default; kept, 0 or 51,200. With transparent huge pages always on,
    # a fault maps 2 MiB and the default's count is smaller, so the two are compared.)
    default, kept = faults("default"), faults("keep")
    assert default > 1000 and kept * 5 < default, (default, kept)


def test_the_allocator_policy_is_applied_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_like import memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(memory, "return_freed_tensors_to_the_os", lambda: calls.append("return") or True)
    monkeypatch.setattr(memory, "return_row_blocks_to_the_os",
                        lambda whole: calls.append(f"blocks above {whole}") or True)
    memory.apply_allocator("as_is", elementwise=True)
    memory.apply_allocator("fast", elementwise=False)  # whole tensors only
    memory.apply_allocator("as_is", elementwise=False, row_blocks=0.7)
    assert calls == []
    memory.apply_allocator("fast", elementwise=True)
    memory.apply_allocator("low_memory", elementwise=True)
    memory.apply_allocator("fast", elementwise=False, row_blocks=0.7,  # mostly row blocks of a whole-tensor method
                           whole_tensor_bytes=16 << 20)
    memory.apply_allocator("fast", elementwise=False, row_blocks=0.2)  # the largest tensors only
    assert calls == ["keep", "return", f"blocks above {16 << 20}", "keep"]


def test_the_row_block_mmap_threshold_clears_the_tensors_merged_whole() -> None:
    from mergekit_like.memory import MAX_MMAP_THRESHOLD, ROW_BLOCK_MMAP_THRESHOLD, row_block_mmap_threshold

    assert row_block_mmap_threshold(0) == ROW_BLOCK_MMAP_THRESHOLD == 8 << 20
    assert row_block_mmap_threshold((8 << 20) - 8192) == 8 << 20
    assert row_block_mmap_threshold((8 << 20) - 64) == 16 << 20  # its allocation's header takes it over
    assert row_block_mmap_threshold(8 << 20) == 16 << 20  # an allocation of exactly the threshold is mapped
    assert row_block_mmap_threshold(10 << 20) == 16 << 20
    assert row_block_mmap_threshold(16 << 20) == 32 << 20 == MAX_MMAP_THRESHOLD
    assert row_block_mmap_threshold(1 << 30) == MAX_MMAP_THRESHOLD  # glibc takes no more


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_glibc_takes_the_row_block_thresholds() -> None:
    # In a child: the settings are process-wide. mallopt answers 0 for a threshold it refuses.
    code = ("from mergekit_like import memory as m; "
            "print(m.return_row_blocks_to_the_os(0), m.return_row_blocks_to_the_os(1 << 30))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_row_blocks_of_an_element_wise_method_keep_the_fast_policy(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from helpers import write_checkpoint

    import mergekit_like.merge.options as options_module
    from mergekit_like.merge.engine import planned_merge
    from mergekit_like.merge.options import MergeOptions
    from mergekit_like.merge.recipe import parse_recipe

    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    paths = [write_checkpoint(tmp_path / f"model-{i}", {"model.embed_tokens.weight": torch.full((96, 16), float(i)),
                                                        "model.norm.weight": torch.ones(16)},
                              config={"model_type": "llama"}) for i in range(3)]
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths[1:]]
    recipe = {"base_model": str(paths[0]), "models": models}
    budget = MergeOptions(memory_budget=3 * 4 * 8 * 16 * 4)
    # Row blocks are how an element-wise method streams: they do not count towards the share.
    with planned_merge(parse_recipe({**recipe, "merge_method": "task_arithmetic"}), budget) as plan:
        assert any(t.chunks for t in plan.tensors) and plan.row_block_share == 0.0
        assert plan.whole_tensor_bytes == 16 * 4  # the norm, in float32
    ties = parse_recipe({**recipe, "merge_method": "ties", "parameters": {"density": 0.5}})
    with planned_merge(ties, budget) as plan:
        embedding = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
        assert embedding.chunks and plan.row_block_share == embedding.read_bytes / plan.read_bytes
        assert plan.whole_tensor_bytes == 16 * 4
        # The merge hands the allocator policy both figures.
        import mergekit_like.merge.engine as engine

        seen: list[dict] = []
        monkeypatch.setattr(engine, "apply_allocator", lambda policy, **kwargs: seen.append(kwargs))
        engine.run_merge(plan, tmp_path / "out")
        assert seen == [{"elementwise": False, "row_blocks": plan.row_block_share, "whole_tensor_bytes": 64}]
