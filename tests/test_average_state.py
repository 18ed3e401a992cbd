"""The Averager interface: one LAWA rule, one SFA pull, and state dicts that continue exactly."""

from __future__ import annotations

import json
import queue
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint

from mergekit_like.averaging import EMA, LAWA, SWA, AnchorPull, Averager, UniformMean, lawa_selection, sfa_merge
from mergekit_like.averaging.sfa import check_beta, sfa_pull
from mergekit_like.errors import HookUsageError, InvalidCheckpointError, UnknownAverageError
from mergekit_like.hook import tensors as hook_tensors
from mergekit_like.hook import weight_averaging
from mergekit_like.hook.sidecar import Sidecar, SidecarConfig, load_state, serve, write_state


def snap(value: float, seen: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value, 2 * value, -value]), "n": torch.tensor(seen)}


def mean_of(snapshots: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    mean = UniformMean()
    for step, snapshot in snapshots:
        mean.update(snapshot, step)
    return mean.result()


# -- LAWA: the command's newest-first rule, online ------------------------------------------


def test_online_lawa_takes_the_newest_snapshot_and_the_newest_nu_before_it() -> None:
    lawa = LAWA(k=2, nu=1000)
    for step in (500, 1000, 1500, 2000):
        lawa.update(snap(float(step), step), step)
    assert lawa.chosen_steps == [1000, 2000]  # what `average --method lawa --k 2 --nu 1000` averages
    assert torch.equal(lawa.result()["w"], torch.tensor([1500.0, 3000.0, -1500.0]))
    assert lawa.result()["n"].item() == 2000


def test_online_lawa_keeps_every_snapshot_a_later_selection_could_choose() -> None:
    lawa = LAWA(k=3, nu=10)
    kept = []
    for step in (0, 5, 10, 15, 20, 25):
        lawa.update(snap(float(step)), step)
        kept.append(lawa.steps)
    # The chain from the newest: 10,0 | 15,5 | 20,10,0 (full) | 25,15,5 (full: 0 can go).
    assert kept == [[0], [0, 5], [0, 5, 10], [0, 5, 10, 15], [0, 5, 10, 15, 20], [5, 10, 15, 20, 25]]


@pytest.mark.parametrize("seed", range(20))
def test_online_lawa_equals_the_selection_over_all_snapshots_after_every_update(seed: int) -> None:
    rng = random.Random(seed)
    k, nu = rng.randint(1, 4), rng.randint(0, 12)
    lawa = LAWA(k=k, nu=nu)
    seen: list[tuple[int, dict[str, torch.Tensor]]] = []
    step = 0
    for _ in range(30):
        step += rng.randint(1, 7)
        snapshot = snap(rng.uniform(-5, 5), step)
        seen.append((step, snapshot))
        lawa.update(snapshot, step)
        chosen = [seen[i] for i in lawa_selection([s for s, _ in seen], k, nu)]
        assert lawa.chosen_steps == [s for s, _ in chosen], (k, nu, step)
        expected = mean_of(chosen)
        assert all(torch.equal(lawa.result()[n], expected[n]) for n in expected)
    assert len(lawa.kept) < len(seen)  # snapshots no selection can choose any more were dropped


# -- SFA: one pull ---------------------------------------------------------------------------


def test_sfa_merge_anchor_pull_and_the_hooks_chunked_merge_back_are_one_pull(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    g = torch.Generator().manual_seed(0)
    model, anchor = torch.randn(23, generator=g), torch.randn(23, generator=g)
    expected = sfa_pull(model, anchor, 0.3)
    assert torch.equal(expected, torch.lerp(model, anchor, 0.3))
    assert torch.equal(sfa_merge({"w": model}, {"w": anchor}, 0.3)["w"], expected)
    pull = AnchorPull(0.3)
    pull.update({"w": anchor}, 0)
    pull.update({"w": model}, 1)
    assert torch.equal(pull.result()["w"], expected)
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", 5)  # five chunks and a short one
    live = model.clone()
    hook_tensors.pull_in_chunks(live, anchor, 0.3)
    assert torch.equal(live, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.7, 1.0])  # lerp switches formula at 0.5
def test_the_pull_in_place_gives_the_bits_of_the_pull_out_of_place(dtype: torch.dtype, beta: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    theta, theta_o = (torch.randn(4, 23, generator=g).to(dtype) for _ in range(2))
    expected = torch.lerp(theta, theta_o, beta)
    into = theta.clone()
    assert sfa_pull(into, theta_o, beta, out=into) is into and torch.equal(into, expected)
    elsewhere = torch.empty_like(theta)
    assert sfa_pull(theta, theta_o, beta, out=elsewhere) is elsewhere and torch.equal(elsewhere, expected)
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", 7)  # chunks that cut rows, and a short last one
    live = theta.clone()
    hook_tensors.pull_in_chunks(live, theta_o, beta)
    assert torch.equal(live, expected)


@pytest.mark.gpu
def test_the_merge_back_on_cuda_pulls_in_place_to_the_bits_of_lerp(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(1000, generator=g).to("cuda", torch.bfloat16)
    anchor = torch.randn(1000, generator=g).to(torch.bfloat16).pin_memory()
    expected = torch.lerp(theta, anchor.cuda(), 0.3)
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", 300)
    hook_tensors.pull_in_chunks(theta, anchor, 0.3)
    assert torch.equal(theta, expected)


def test_a_merge_back_checks_beta_once_not_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[float] = []

    def check(beta: float) -> None:
        checked.append(beta)
        check_beta(beta)

    monkeypatch.setattr("mergekit_like.averaging.sfa.check_beta", check)
    monkeypatch.setattr(weight_averaging, "check_beta", check)
    monkeypatch.setattr(hook_tensors, "SFA_CHUNK", 2)
    model = torch.nn.Linear(4, 3)  # weight and bias: eight chunks
    hook = weight_averaging.WeightAveraging(model, [weight_averaging.SFA(beta=0.5)])
    hook.start_task()
    checked.clear()  # SFA(...) checked it when it was made
    hook.merge_back()
    assert checked == [0.5]
    assert hook.sfa is not None
    hook.sfa.beta = 1.5  # SFA is a plain dataclass: a beta set later is checked too
    with pytest.raises(ValueError, match="beta must be in"):
        hook.merge_back()
    hook.close()


def test_every_way_to_give_beta_refuses_one_outside_zero_to_one() -> None:
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta must be in"):
            check_beta(beta)
        with pytest.raises(ValueError, match="beta must be in"):
            sfa_merge({"w": torch.ones(1)}, {"w": torch.zeros(1)}, beta)
        with pytest.raises(ValueError, match="beta must be in"):
            AnchorPull(beta)
        with pytest.raises(ValueError, match="beta must be in"):
            weight_averaging.SFA(beta=beta)


def test_ema_factor_before_a_snapshot_says_what_to_call() -> None:
    with pytest.raises(HookUsageError, match=r"call update\(\) first"):
        EMA(0.9).factor(10)


# -- state dicts -----------------------------------------------------------------------------

AVERAGERS: dict[str, Callable[[], Averager]] = {
    "ema": lambda: EMA(0.9),
    "ema_half_life": lambda: EMA(half_life=3.0),
    "swa": lambda: SWA(start=2),
    "mean": UniformMean,
    "lawa": lambda: LAWA(k=2, nu=2),
    "sfa": lambda: AnchorPull(0.25),
}


def fed(make: Callable[[], Averager], steps: range) -> Averager:
    averager = make()
    for step in steps:
        averager.update(snap(float(step) ** 1.5, step), step)
    return averager


def assert_same(a: Averager, b: Averager) -> None:
    assert a.last_step == b.last_step and a.ready == b.ready
    ra, rb = a.result(), b.result()
    assert ra.keys() == rb.keys()
    assert all(torch.equal(ra[n], rb[n]) for n in ra)


@pytest.mark.parametrize("name", list(AVERAGERS))
def test_a_loaded_state_dict_continues_exactly(name: str) -> None:
    make = AVERAGERS[name]
    original = fed(make, range(1, 5))
    copy = make()
    copy.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in original.state_dict().items()})
    assert_same(copy, original)
    for step in (6, 9):
        original.update(snap(step / 3, step), step)
        copy.update(snap(step / 3, step), step)
    assert_same(copy, original)


@pytest.mark.parametrize("name", list(AVERAGERS))
def test_the_sidecars_state_directory_round_trips_every_averager(name: str, tmp_path: Path) -> None:
    make = AVERAGERS[name]
    for steps in (range(1, 2), range(1, 6)):  # one snapshot (SFA: the anchor alone), and several
        original = fed(make, steps)
        write_state(tmp_path / name, original)
        restored = make()
        load_state(tmp_path / name, restored)
        assert_same(restored, original)
        restored.update(snap(-1.0, 40), 40)
        original.update(snap(-1.0, 40), 40)
        assert_same(restored, original)


def write_old_state(directory: Path, meta: dict, groups: list[dict[str, torch.Tensor]]) -> None:
    """A state directory as earlier versions of the sidecar wrote it."""
    write_checkpoint(directory, {f"{i}/{n}": t for i, group in enumerate(groups) for n, t in group.items()})
    (directory / "state.json").write_text(json.dumps(meta) + "\n")


def test_state_directories_of_earlier_versions_are_read(tmp_path: Path) -> None:
    ema_state = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(7)}
    write_old_state(tmp_path / "ema", {"label": "ema_0.9", "last_step": 30, "kind": "EMA", "count": 3,
                                       "snapshots": [30]}, [ema_state])
    ema = EMA(0.9)
    load_state(tmp_path / "ema", ema)
    assert ema.count == 3 and ema.last_step == 30 and torch.equal(ema.result()["w"], ema_state["w"])
    # LAWA kept its window oldest first and saved no count; its last step may be past the window.
    write_old_state(tmp_path / "lawa", {"label": "lawa_k2_nu10", "last_step": 25, "kind": "LAWA", "count": None,
                                        "snapshots": [10, 20]}, [snap(1.0, 10), snap(3.0, 20)])
    lawa = LAWA(k=2, nu=10)
    load_state(tmp_path / "lawa", lawa)
    assert lawa.steps == [10, 20] and lawa.last_step == 25
    assert torch.equal(lawa.result()["w"], torch.tensor([2.0, 4.0, -2.0]))


@pytest.mark.parametrize("meta", ["{not json", "[1]", '{"kind": "SWA", "snapshots": [1], "count": 1, "last_step": 1}',
                                  '{"kind": "EMA", "snapshots": [1, 2], "count": 1, "last_step": 1}',
                                  '{"kind": "EMA", "snapshots": "x", "count": 1, "last_step": 1}',
                                  '{"kind": "EMA", "snapshots": [1], "count": true, "last_step": 1}',
                                  '{"kind": "EMA", "snapshots": [1], "count": 1}'])
def test_a_malformed_state_is_the_tools_error(tmp_path: Path, meta: str) -> None:
    write_checkpoint(tmp_path / "state", {"0/w": torch.ones(3)})
    (tmp_path / "state" / "state.json").write_text(meta)
    problem = r"is not valid JSON|is not a JSON object|holds the state of a SWA, not of a EMA|is no state of ema_0\.9"
    with pytest.raises(InvalidCheckpointError, match=problem):
        load_state(tmp_path / "state", EMA(0.9))


# -- the sidecar answers bad requests ---------------------------------------------------------


def test_the_sidecar_answers_a_bad_request_with_an_error_and_keeps_serving(tmp_path: Path) -> None:
    buffers = {"w": torch.zeros(3), "n": torch.tensor(0)}
    sidecar = Sidecar(SidecarConfig(tmp_path, [EMA(0.9), SWA(start=100)], save_every=None), buffers)
    replies: queue.Queue = queue.Queue()
    free = threading.Event()
    assert serve(sidecar, ("average", 1, "ema"), replies, free)
    status, request, (kind, message) = replies.get_nowait()
    assert (status, request, kind) == ("error", 1, UnknownAverageError.__name__)
    assert "ema_0.9, swa_from100" in message
    buffers["w"].fill_(2.0)
    assert serve(sidecar, ("snapshot", 5), replies, free) and free.is_set()
    assert serve(sidecar, ("average", 2, "swa_from100"), replies, free)
    assert replies.get_nowait()[2] == (HookUsageError.__name__,
                                       "the average 'swa_from100' holds no snapshot yet; ask for it once step() "
                                       "has taken a snapshot that it accepts")
    assert serve(sidecar, ("average", 3, "ema_0.9"), replies, free)
    status, request, value = replies.get_nowait()
    assert (status, request) == ("ok", 3) and torch.equal(value["w"], torch.full((3,), 2.0))
    assert not serve(sidecar, ("close", 4, None), replies, free)  # close ends it, after one last save
    assert replies.get_nowait() == ("ok", 4, 5)
    assert (tmp_path / "ema_0.9" / "latest").exists()


def test_a_restored_average_of_other_tensor_names_is_refused_at_start(tmp_path: Path) -> None:
    ema = EMA(0.9)
    ema.update({"module.w": torch.ones(3)}, 1)  # saved while the hook took the DDP wrapper's names
    write_state(tmp_path / "ema_0.9" / "state", ema)
    with pytest.raises(InvalidCheckpointError, match=r"other tensors than the model's.*'module.w' where the model "
                                                     r"has 'w'.*Remove this state directory"):
        Sidecar(SidecarConfig(tmp_path, [EMA(0.9)], save_every=None), {"w": torch.zeros(3)})
