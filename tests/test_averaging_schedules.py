"""EDM2's power-function EMA and the EMA warm-up: closed forms and the reference implementations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergekit_like.averaging.ema import EMA
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.averaging.power_ema import MAX_SIGMA_REL, PowerEMA, gamma_to_sigma_rel, sigma_rel_to_gamma


def trajectory(steps: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    walk = torch.cumsum(torch.randn(len(steps), 6, 5, generator=g, dtype=torch.float64), dim=0)
    return {step: walk[i] for i, step in enumerate(steps)}


def power_closed_form(points: dict[int, torch.Tensor], gamma: float) -> torch.Tensor:
    """sum_k (s_k^(g+1) - s_(k-1)^(g+1)) / t^(g+1) theta_k, s_0 = 0, in float64."""
    steps = sorted(points)
    t = steps[-1]
    total = torch.zeros_like(points[t])
    previous = 0
    for step in steps:
        total += (step ** (gamma + 1) - previous ** (gamma + 1)) / t ** (gamma + 1) * points[step]
        previous = step
    return total


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("every", [1, 7])
def test_power_ema_tracked_online_is_edm2_closed_form(sigma_rel: float, every: int) -> None:
    steps = list(range(every, 2000 + 1, every))
    points = trajectory(steps)
    average = PowerEMA(sigma_rel)
    for step in steps:
        average.update({"w": points[step].float()}, step)
    expected = power_closed_form(points, sigma_rel_to_gamma(sigma_rel))
    error = (average.result()["w"].double() - expected).norm() / expected.norm()
    assert error < 1e-6


def test_power_ema_per_step_is_edm2_beta() -> None:
    # EDM2: beta_t = (1 - 1/t)^(gamma + 1) at every step t (t counts from 1).
    gamma = 6.94
    average = PowerEMA(gamma=gamma)
    reference = None
    for t, x in trajectory(list(range(1, 60))).items():
        average.update({"w": x.float()}, t)
        beta = (1 - 1 / t) ** (gamma + 1)
        reference = x.clone() if reference is None else beta * reference + (1 - beta) * x
    assert reference is not None
    torch.testing.assert_close(average.result()["w"].double(), reference, rtol=1e-6, atol=1e-6)


def test_sigma_rel_and_gamma_are_edm2s() -> None:
    # EDM2's table: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    for sigma_rel in (0.01, 0.05, 0.15, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, math.nan])
def test_power_ema_refuses_widths_it_cannot_have(bad: float) -> None:
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        PowerEMA(bad)


def test_power_ema_state_round_trip_continues_exactly() -> None:
    points = trajectory(list(range(10, 310, 10)))
    whole, first = PowerEMA(0.1), PowerEMA(0.1)
    for step, x in points.items():
        whole.update({"w": x.float()}, step)
        if step <= 150:
            first.update({"w": x.float()}, step)
    resumed = PowerEMA(0.1)
    resumed.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.state_dict().items()})
    for step, x in points.items():
        if step > 150:
            resumed.update({"w": x.float()}, step)
    assert torch.equal(resumed.result()["w"], whole.result()["w"])


# -- EMA warm-up -------------------------------------------------------------------------------


def test_warmup_decay_is_the_inv_gamma_schedule() -> None:
    ema = EMA(0.999, warmup="inv_gamma", inv_gamma=1.0, power=2 / 3)
    assert ema.step_decay(0) == 0.0
    assert ema.step_decay(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.step_decay(10 ** 6) == 0.999  # capped by the decay
    floor = EMA(0.99, warmup="inv_gamma", min_decay=0.5)
    assert floor.step_decay(1) == 0.5


@pytest.mark.integration
@pytest.mark.parametrize(("after", "inv_gamma", "power", "min_value"), [(0, 1.0, 2 / 3, 0.0), (5, 10.0, 0.75, 0.1)])
def test_warmup_equals_ema_pytorch_step_by_step(after: int, inv_gamma: float, power: float, min_value: float) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is the reference (an integration dependency)")
    model = torch.nn.Linear(5, 6)
    reference = ema_pytorch.EMA(model, beta=0.999, update_after_step=after, update_every=1, inv_gamma=inv_gamma,
                                power=power, min_value=min_value)
    ours = EMA(0.999, warmup="inv_gamma", inv_gamma=inv_gamma, power=power, min_decay=min_value,
               start_step=after + 1 if after else None)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 80):  # the hook's step t is ema-pytorch's update number t - 1
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        reference.update()
        ours.update(dict(model.state_dict()), step)
        if ours.ready:
            for name, value in reference.ema_model.state_dict().items():
                torch.testing.assert_close(ours.result()[name], value, rtol=1e-6, atol=1e-7,
                                           msg=f"step {step}: {name}")


def test_warmup_across_snapshot_gaps_is_the_product_of_the_steps() -> None:
    every_step, sparse = EMA(0.99, warmup="inv_gamma"), EMA(0.99, warmup="inv_gamma")
    x = {"w": torch.ones(3)}
    every_step.update(x, 1)
    sparse.update(x, 1)
    expected = 1.0
    for step in range(2, 11):
        expected *= every_step.step_decay(step - 1)
    assert sparse.factor(10) == pytest.approx(expected, rel=1e-12)


def test_warmup_state_records_the_start_and_refuses_a_state_without_it() -> None:
    ema = EMA(0.99, warmup="inv_gamma")
    for step in (3, 4, 5):
        ema.update({"w": torch.full((2,), float(step))}, step)
    state = ema.state_dict()
    assert state["first_step"] == 3
    resumed = EMA(0.99, warmup="inv_gamma")
    resumed.load_state_dict(state)
    assert resumed.factor(6) == ema.factor(6)
    with pytest.raises(ValueError, match="at which step the average started"):
        EMA(0.99, warmup="inv_gamma").load_state_dict({k: v for k, v in state.items() if k != "first_step"})
    EMA(0.99).load_state_dict({k: v for k, v in state.items() if k != "first_step"})  # no warm-up: not needed


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"warmup": "linear"}, "warmup must be one of"), ({"warmup": "inv_gamma", "inv_gamma": 0}, "inv_gamma"),
    ({"warmup": "inv_gamma", "power": -1}, "power"), ({"warmup": "inv_gamma", "min_decay": 0.9999}, "min_decay"),
])
def test_bad_warmup_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMA(0.999, **kwargs)


def test_start_step_skips_earlier_snapshots_for_ema_and_lawa() -> None:
    ema, lawa = EMA(0.5, start_step=3), LAWA(k=2, start_step=3)
    for step in range(1, 6):
        x = {"w": torch.full((2,), float(step))}
        assert ema.update(x, step) == (step >= 3)
        assert lawa.update(x, step) == (step >= 3)
    # EMA: 3, then 0.5*3 + 0.5*4 = 3.5, then 0.5*3.5 + 0.5*5 = 4.25 ; LAWA: mean of 4 and 5
    assert torch.equal(ema.result()["w"], torch.full((2,), 4.25))
    assert torch.equal(lawa.result()["w"], torch.full((2,), 4.5))
    assert ema.label == "ema_0.5_from3" and lawa.label == "lawa_k2_nu0_from3"


# -- the offline command -----------------------------------------------------------------------


def test_the_average_command_tracks_power_ema_and_warmed_up_ema_as_the_hook_does(tmp_path: Path) -> None:
    from helpers import write_checkpoint
    from mergekit_like.cli.main import app
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    steps = [5, 10, 20, 40, 80]
    points = trajectory(steps)
    for step in steps:
        write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", {"w": points[step].float()})
    runner = CliRunner()
    result = runner.invoke(app, ["average", str(tmp_path / "run"), "--method", "power_ema", "--sigma-rel",
                                 "0.1,0.2", "-o", str(tmp_path / "power"), "-q"])
    assert result.exit_code == 0, result.output
    for sigma_rel in (0.1, 0.2):
        online = PowerEMA(sigma_rel)
        for step in steps:
            online.update({"w": points[step].float()}, step)
        written = load_file(tmp_path / "power" / f"power_ema_sr{sigma_rel:g}" / "model.safetensors")
        assert torch.equal(written["w"], online.result()["w"])
    result = runner.invoke(app, ["average", str(tmp_path / "run"), "--method", "ema", "--decay", "0.9",
                                 "--warmup", "inv_gamma", "--power", "0.75", "--start", "10", "-o",
                                 str(tmp_path / "ema"), "-q"])
    assert result.exit_code == 0, result.output
    online_ema = EMA(0.9, warmup="inv_gamma", power=0.75, start_step=10)
    for step in steps:
        online_ema.update({"w": points[step].float()}, step)
    assert torch.equal(load_file(tmp_path / "ema" / "model.safetensors")["w"], online_ema.result()["w"])
    assert "--warmup inv_gamma" in (tmp_path / "ema" / "README.md").read_text()
