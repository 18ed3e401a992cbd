from __future__ import annotations

import pytest
import torch

from mergekit_like.io.sharding import TensorSpec, parse_size, plan_shards


def test_parse_size_uses_decimal_units_like_huggingface_hub() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500
    assert parse_size(123) == 123
    for bad in ("", "GB", "5XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_fills_shards_in_order_and_isolates_oversized_tensors() -> None:
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 100, 5, 5])]
    plans = plan_shards(specs, max_shard_size=80)
    assert [[t.name for t in p.tensors] for p in plans] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [p.filename for p in plans] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_single_shard_is_named_model_safetensors() -> None:
    plans = plan_shards([TensorSpec("a", torch.float16, (3,))], prefix="adapter_model")
    assert [p.filename for p in plans] == ["adapter_model.safetensors"]
