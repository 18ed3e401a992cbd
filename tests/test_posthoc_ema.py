"""Post-hoc EMA: profiles stored by the hook, any length reconstructed after training by `average`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.averaging.posthoc import SNAPSHOT_INFO, PostHocEMA, find_snapshots, profile_dot, reconstruct
from mergekit_like.averaging.power_ema import PowerEMA, sigma_rel_to_gamma
from mergekit_like.hook import WeightAveraging
from mergekit_like.io import open_checkpoint

runner = CliRunner()
STEPS, EVERY = 600, 20


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def walk(model: torch.nn.Module, hook: WeightAveraging, steps: int) -> None:
    """A drifting random walk: the weights move toward a target with noise, as a training run does."""
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    for _ in range(steps):
        with torch.no_grad():
            for p, target in zip(model.parameters(), targets):
                p.add_(0.01 * (target - p) + 0.05 * torch.randn(p.shape, generator=g))
        hook.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "avg"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    averages = [PostHocEMA((0.05, 0.15), snapshot_every=EVERY, dtype=torch.float32), PowerEMA(0.09), PowerEMA(0.05)]
    hook = WeightAveraging(model, averages, out_dir=out, strict=True)
    assert hook.wait_until_ready(60)
    walk(model, hook, STEPS + 7)  # not a multiple: the last profiles are stored at close
    hook.close()
    return out


def test_the_hook_stores_each_profile_on_its_cadence_and_at_the_end(trained: Path) -> None:
    stored = find_snapshots(trained / "posthoc_ema_0.05_0.15")
    steps = sorted({s.step for s in stored})
    assert steps == [*range(EVERY, STEPS + 1, EVERY), STEPS + 7]
    assert len(stored) == 2 * len(steps)
    narrow = next(s for s in stored if s.path.parent.name == "power_ema_sr0.05")
    info = json.loads((narrow.path / SNAPSHOT_INFO).read_text())
    assert info["gamma"] == pytest.approx(sigma_rel_to_gamma(0.05)) and info["sigma_rel"] == pytest.approx(0.05)
    # The stored profile at the end is the directly tracked PowerEMA of the same width, bit for bit.
    last = next(s for s in stored if s.step == STEPS + 7 and s.gamma == info["gamma"])
    direct = read(trained / "power_ema_sr0.05" / "latest")
    assert all(torch.equal(read(last.path)[n], direct[n]) for n in direct)


def test_a_reconstructed_length_approximates_the_one_tracked_directly(trained: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["average", str(trained / "posthoc_ema_0.05_0.15"), "--method", "phema",
                                 "--sigma-rel", "0.09", "-o", str(tmp_path / "rec"), "--json",
                                 "--plot", str(tmp_path / "weights.png")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    error = summary["reconstruction"]["phema_sr0.09"]["error"]
    assert error < 0.05
    rebuilt, direct = read(tmp_path / "rec"), read(trained / "power_ema_sr0.09" / "latest")
    narrow = read(trained / "power_ema_sr0.05" / "latest")
    for name, value in direct.items():
        # Within 1% of the distance to the stored 0.05 profile (measured: 0.03% to 0.1%).
        assert (rebuilt[name] - value).norm() < 0.01 * (narrow[name] - value).norm(), name
    assert (tmp_path / "weights.png").stat().st_size > 10_000
    card = (tmp_path / "rec" / "README.md").read_text()
    assert "reconstruction_error" in card


def test_a_length_the_profiles_cannot_reach_is_warned_about(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["average", str(trained / "posthoc_ema_0.05_0.15"), "--method", "phema",
                                 "--sigma-rel", "0.01", "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    assert "phema_sr0.01: the stored snapshots reconstruct this length with a relative profile error of" in \
        " ".join(result.output.split())


def test_reconstructing_a_stored_profile_gives_it_back() -> None:
    steps = [10, 20, 30, 10, 20, 30]
    gammas = [sigma_rel_to_gamma(0.05)] * 3 + [sigma_rel_to_gamma(0.1)] * 3
    found = reconstruct(steps, gammas, 0.1, 30)
    assert found.error < 1e-6
    np.testing.assert_allclose(found.weights, [0, 0, 0, 0, 0, 1], atol=1e-6)


def test_profile_inner_products_are_the_integrals() -> None:
    # <p_(t,g), p_(t,g)> = (g+1)^2 / ((2g+1) t): numerically integrated against the closed form.
    for t_a, g_a, t_b, g_b in [(10.0, 3.0, 10.0, 3.0), (10.0, 2.0, 25.0, 7.0), (40.0, 16.0, 12.0, 0.5)]:
        tau = np.linspace(0, min(t_a, t_b), 200_001)
        product = ((g_a + 1) * tau ** g_a / t_a ** (g_a + 1)) * ((g_b + 1) * tau ** g_b / t_b ** (g_b + 1))
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(product, tau), rel=1e-6)


def test_profiles_of_long_runs_do_not_overflow() -> None:
    found = reconstruct([10 ** 6, 2 * 10 ** 6] * 2, [sigma_rel_to_gamma(0.02)] * 2 + [sigma_rel_to_gamma(0.04)] * 2,
                        0.03, 2 * 10 ** 6)
    assert np.isfinite(found.weights).all() and found.error < 1


def test_post_hoc_state_round_trip_and_bad_settings() -> None:
    average = PostHocEMA((0.05, 0.1), snapshot_every=2)
    for step in range(1, 6):
        average.update({"w": torch.full((3,), float(step))}, step)
    due = average.stored_snapshots()
    assert [s.info["step"] for s in due] == [5, 5] and average.stored_step == 5  # 4 was crossed; stored at 5
    resumed = PostHocEMA((0.05, 0.1), snapshot_every=2)
    resumed.load_state_dict(average.state_dict())
    assert resumed.stored_step == 5 and torch.equal(resumed.result()["w"], average.result()["w"])
    assert resumed.stored_snapshots(final=True) == []  # nothing new since
    with pytest.raises(ValueError, match="at least two different sigma_rels"):
        PostHocEMA((0.05,))
    with pytest.raises(ValueError, match="snapshot_every"):
        PostHocEMA(snapshot_every=0)


@pytest.mark.integration
def test_the_reconstruction_equals_ema_pytorchs_synthesize_ema_model(trained: Path, tmp_path: Path) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is the reference (an integration dependency)")
    from ema_pytorch.post_hoc_ema import PostHocEMA as Reference

    stored = find_snapshots(trained / "posthoc_ema_0.05_0.15")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference = Reference(model, sigma_rels=(0.05, 0.15), checkpoint_every_num_steps="manual",
                          checkpoint_folder=str(tmp_path / "ref"))
    template = reference.ema_models[0].state_dict()
    for snapshot in stored:  # our snapshots, in ema-pytorch's files: <profile>.<step>.pt
        index = [pytest.approx(g) for g in reference.gammas].index(snapshot.gamma)
        tensors = read(snapshot.path)
        package = {k: (tensors[k.removeprefix("ema_model.")] if k.startswith("ema_model.") else v)
                   for k, v in template.items()}
        torch.save(package, tmp_path / "ref" / f"{index}.{snapshot.step}.pt")
    synthesized = reference.synthesize_ema_model(sigma_rel=0.09).ema_model.state_dict()
    result = runner.invoke(app, ["average", str(trained / "posthoc_ema_0.05_0.15"), "--method", "phema",
                                 "--sigma-rel", "0.09", "-o", str(tmp_path / "ours"), "--quiet"])
    assert result.exit_code == 0, result.output
    ours = read(tmp_path / "ours")
    for name, value in synthesized.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert ema_pytorch is not None
