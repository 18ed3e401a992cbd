"""`mergekit-like average` and the training hook apply one rule each: the same trajectory gives the same bytes.

A small model whose weights equal the step (plus a tensor that rounds in bf16, and an
integer buffer) is snapshotted by the hook at steps 500, 1000, 1500 and 2000 and saved
as the checkpoints step_500/ ... step_2000/ that the command averages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.averaging import EMA, LAWA, SWA, AnchorPull
from mergekit_like.hook import WeightAveraging
from mergekit_like.io import open_checkpoint

STEPS = (500, 1000, 1500, 2000)
runner = CliRunner()


class Tiny(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=dtype))
        self.scale = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def go_to(self, step: int) -> None:
        self.weight.fill_(step)
        self.scale.copy_(step * 1.01 + torch.arange(5) / 7)  # rounds in bf16: the averages differ from a mean
        self.seen.fill_(step)


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


# method -> (the hook's average, its label, the command's options)
CASES = {
    "ema": (lambda: EMA(0.999), "ema_0.999", ["--method", "ema", "--decay", "0.999"]),
    "swa": (SWA, "swa", ["--method", "swa"]),
    "lawa": (lambda: LAWA(k=2, nu=1000), "lawa_k2_nu1000", ["--method", "lawa", "--k", "2", "--nu", "1000"]),
    # SFA: the command pulls the newest checkpoint toward --anchor (the first); the sidecar's
    # AnchorPull takes its first snapshot as the anchor and pulls each later one toward it.
    "sfa": (lambda: AnchorPull(0.25), "sfa_beta0.25", ["--method", "sfa", "--beta", "0.25"]),
}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the run directory of checkpoints, the hook's out_dir) for one training of 2000 steps."""
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    model = Tiny(request.param)
    hook = WeightAveraging(model, [make() for make, _, _ in CASES.values()], snapshot_every=500,
                           out_dir=root / "hook", strict=True)
    for step in range(1, STEPS[-1] + 1):
        if step in STEPS:
            model.go_to(step)
            write_checkpoint(root / "run" / f"step_{step}", {n: t.clone() for n, t in model.state_dict().items()})
        hook.step()
    counts = hook.close()
    assert counts.taken == len(STEPS) and counts.skipped == 0
    return root / "run", root / "hook"


@pytest.mark.parametrize("method", list(CASES))
def test_the_command_and_the_hook_write_the_same_tensors(trained: tuple[Path, Path], tmp_path: Path,
                                                         method: str) -> None:
    """Every tensor of the command's output equals the hook's final average, dtype and bits.

    EMA (decay per step, so the 500-step gaps count), SWA and LAWA (k=2, nu=1000) average
    the four checkpoints. SFA compares the one rule the two share: the command's
    ``--method sfa --anchor step_500 step_2000`` against the sidecar's AnchorPull, whose
    anchor is its first snapshot (step 500) and whose result pulls the newest (step 2000)
    toward it.
    """
    run, hook_dir = trained
    _, label, arguments = CASES[method]
    inputs = [str(run / "step_2000"), "--anchor", str(run / "step_500")] if method == "sfa" else [str(run)]
    result = runner.invoke(app, ["average", *inputs, *arguments, "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    offline, online = read(tmp_path / "out"), read(hook_dir / label / "latest")
    assert offline.keys() == online.keys() == {"weight", "scale", "seen"}
    for name in offline:
        assert offline[name].dtype == online[name].dtype, name
        assert torch.equal(offline[name], online[name]), (method, name)
    assert online["seen"].item() == 2000  # integers from the newest checkpoint averaged


def test_lawa_averages_the_newest_checkpoint_and_the_one_nu_before_it(trained: tuple[Path, Path]) -> None:
    _, hook_dir = trained
    lawa = read(hook_dir / "lawa_k2_nu1000" / "latest")
    assert torch.equal(lawa["weight"], torch.full((3, 4), 1500.0).to(lawa["weight"].dtype))  # steps 1000, 2000
