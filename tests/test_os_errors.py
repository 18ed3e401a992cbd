"""The system's refusals (permissions, read-only file systems, descriptor limits) are one line each.

Permissions are reproduced for real where cheap: as root the tests run the CLI as ``nobody``
(setpriv), so that mode bits apply. What cannot be produced here (EROFS) is injected.
The last section checks the start-up: ``--help`` and ``--version`` import no command (no torch).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from mergekit_like.cli.output import SESSION, handle_errors
from typer.testing import CliRunner

from mergekit_like.errors import FileAccessError, OutputWriteError, from_os_error
from mergekit_like.io import atomic_directory

runner = CliRunner()
NOBODY = 65534


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def one_error_line(stderr: str) -> str:
    """The error line of a failed run: the last line of stderr (a progress bar may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


# -- the error types ------------------------------------------------------------------------------


def test_an_os_error_becomes_one_line_naming_the_path_what_and_the_fix() -> None:
    error = from_os_error(PermissionError(errno.EACCES, "Permission denied", "m/model.safetensors"), FileAccessError)
    assert str(error) == ("m/model.safetensors: permission denied. Check its permissions (ls -l) or those of its "
                          "directory, or use a path this user may access.")
    assert isinstance(error, OSError) and error.errno == errno.EACCES  # callers testing the errno keep working
    many = from_os_error(OSError(errno.EMFILE, "Too many open files", "m/model.safetensors"), FileAccessError)
    assert str(many).endswith("too many open files. Raise the limit with ulimit -n or merge fewer inputs at once.")
    read_only = from_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x"), FileAccessError)
    assert "/mnt/x: read-only file system." in str(read_only)


def _failing_command(error: BaseException) -> Any:
    @handle_errors
    def command() -> None:
        raise error

    return command


def test_handle_errors_prints_any_remaining_os_error_as_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(typer.Exit) as exited:
        _failing_command(PermissionError(errno.EACCES, "Permission denied", "in/model.safetensors"))()
    assert exited.value.exit_code == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: in/model.safetensors: permission denied.")
    with pytest.raises(BrokenPipeError):  # `| head`: left to Typer, which exits quietly
        _failing_command(BrokenPipeError(errno.EPIPE, "Broken pipe"))()
    monkeypatch.setattr(SESSION, "debug", True)
    with pytest.raises(PermissionError):  # --debug: the traceback
        _failing_command(PermissionError(errno.EACCES, "Permission denied", "x"))()


# -- outputs: atomic_directory ---------------------------------------------------------------------


def test_a_read_only_file_system_is_an_output_write_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    source = write_checkpoint(tmp_path / "src", {"w": torch.ones(3)})
    monkeypatch.setattr(os, "open", read_only)
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert ".out.lock: read-only file system. Write the output to a writable file system" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_running_out_of_descriptors_in_the_block_still_removes_the_temporary(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = tmp_path / "out"
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))  # few enough to use them all up
    try:
        with pytest.raises(OSError) as info:
            with atomic_directory(target) as temp:
                (temp / "sub").mkdir()  # rmtree needs more descriptors for each directory level
                (temp / "sub" / "model.safetensors").write_bytes(b"x")
                while True:  # the inputs of a merge of too many models, still open as the block fails
                    held.append(os.open(os.devnull, os.O_RDONLY))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.errno == errno.EMFILE and not isinstance(info.value, OutputWriteError)  # not the output's
    assert leftovers(tmp_path) == [] and not target.exists()


def test_greedy_soup_scratch_on_a_read_only_file_system_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergekit_like import soup

    def read_only(**kwargs: Any) -> str:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "greedy-soup-1-x"))

    monkeypatch.setattr(soup.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputWriteError, match=r"cannot create the greedy soup's scratch directory \(read-only"):
        with soup._scratch(tmp_path):
            pass


# -- the CLI as an unprivileged user ---------------------------------------------------------------

UNPRIVILEGED_RUNS = """
import json, sys
from typer.testing import CliRunner
from mergekit_like.cli.main import app

runner = CliRunner()
results = {}
for name, args in json.loads(sys.argv[1]).items():
    result = runner.invoke(app, args)
    unexpected = result.exception if not isinstance(result.exception, SystemExit) else None
    results[name] = {"code": result.exit_code, "stderr": result.stderr, "exception": repr(unexpected)}
print(json.dumps(results))
"""


def _as_unprivileged_user() -> list[str]:
    if os.geteuid() != 0:
        return []  # mode bits already apply to this user
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the CLI as an unprivileged user")
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[tuple[Path, dict[str, dict[str, Any]]]]:
    """Every case run once, in one unprivileged process (torch loads once): ``{case: result}``."""
    prefix = _as_unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="os-errors-"))  # not under pytest's tmp dir, which is root's alone
    try:
        yield base, _run_unprivileged(base, prefix)
    finally:
        shutil.rmtree(base)


def _run_unprivileged(base: Path, prefix: list[str]) -> dict[str, dict[str, Any]]:
    base.chmod(0o755)
    a = write_checkpoint(base / "a", {"w": torch.ones(4), "b": torch.zeros(2)})
    b = write_checkpoint(base / "b", {"w": torch.full((4,), 3.0), "b": torch.ones(2)})
    unread = write_checkpoint(base / "unread", {"w": torch.ones(4), "b": torch.zeros(2)})
    (unread / "model.safetensors").chmod(0)
    for writable in ("rw", "home"):
        (base / writable).mkdir()
        (base / writable).chmod(0o777)
    (base / "ro").mkdir()
    (base / "ro").chmod(0o555)
    ro, rw = base / "ro", base / "rw"
    linear = ["merge", "--method", "linear", "-p", "weight=0.5,0.5"]
    cases = {
        "merge": [*linear, str(a), str(b), "-o", str(ro / "out")],
        "convert": ["convert", str(a), str(ro / "out")],
        "average": ["average", str(a), str(b), "--method", "swa", "-o", str(ro / "out")],
        "soup": ["soup", str(a), str(b), "-o", str(ro / "out")],
        "greedy": ["soup", "--greedy", "--eval-cmd", "echo {path} 1", str(a), str(b), "-o", str(ro / "gout")],
        "merge-unreadable": [*linear, str(unread), str(b), "-o", str(rw / "out")],
        "inspect-unreadable": ["inspect", str(unread)],
    }
    env = {**os.environ, "HOME": str(base / "home")}
    done = subprocess.run([*prefix, sys.executable, "-c", UNPRIVILEGED_RUNS, json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    results: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def refused_line(result: dict[str, Any]) -> str:
    """The one error line of an unprivileged run that exited 2 without an exception."""
    assert result["exception"] == "None" and result["code"] == 2, result
    return one_error_line(result["stderr"])


@pytest.mark.parametrize("command", ["merge", "convert", "average", "soup"])
def test_an_unwritable_output_directory_is_one_line_and_leaves_nothing(
    unprivileged: tuple[Path, dict[str, dict[str, Any]]], command: str
) -> None:
    base, results = unprivileged
    line = refused_line(results[command])
    assert f"{base / 'ro' / '.out.lock'}: permission denied" in line, line
    assert f"Make {base / 'ro'} writable for this user, or write the output elsewhere" in line
    assert list((base / "ro").iterdir()) == []


def test_a_greedy_soup_beside_an_unwritable_output_is_one_line(
    unprivileged: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    base, results = unprivileged
    line = refused_line(results["greedy"])
    assert f"{base / 'ro'}: cannot create the greedy soup's scratch directory (permission denied)" in line
    assert list((base / "ro").iterdir()) == []


@pytest.mark.parametrize("command", ["merge-unreadable", "inspect-unreadable"])
def test_an_unreadable_input_is_one_line_naming_it(
    unprivileged: tuple[Path, dict[str, dict[str, Any]]], command: str
) -> None:
    base, results = unprivileged
    line = refused_line(results[command])
    assert f"{base / 'unread' / 'model.safetensors'}: permission denied. Check its permissions" in line, line
    assert list((base / "rw").iterdir()) == []


# -- too many open files, for real ------------------------------------------------------------------

DESCRIPTOR_LIMIT = 64

LIMITED_RUN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from mergekit_like.cli.entry import main
sys.argv = ["mergekit-like", *sys.argv[2:]]
main()
"""


def test_a_soup_of_more_inputs_than_open_files_allowed_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    inputs = [str(write_checkpoint(tmp_path / "many" / f"m{i:03d}", {"w": torch.full((4,), float(i))}))
              for i in range(DESCRIPTOR_LIMIT + 16)]
    out = tmp_path / "soup"
    done = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(DESCRIPTOR_LIMIT), "soup", *inputs, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "model.safetensors: too many open files. Raise the limit with ulimit -n or merge fewer inputs" in line
    assert leftovers(tmp_path) == [] and not out.exists()


# -- start-up: the top-level help and version import no command ----------------------------------

HELP_WITHOUT_TORCH = """
import sys
from mergekit_like.cli.entry import main
sys.argv = ["mergekit-like", *sys.argv[1:]]
try:
    main()
except SystemExit as leaving:
    assert leaving.code == 0, leaving.code
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_top_level_help_and_version_do_not_import_torch(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("torch imported: False"), done.stdout
    assert ("mergekit-like 0.1" if args == ["--version"] else "Usage: mergekit-like [OPTIONS] COMMAND") in done.stdout


def test_the_listing_shows_each_command_as_its_own_help_begins() -> None:
    from mergekit_like.cli.main import COMMANDS, load_command

    for name, entry in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert inspect.cleandoc(command.help or "").split("\n\n")[0].strip() == entry.summary, name


def test_ctrl_c_while_a_command_is_imported_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergekit_like.cli import entry

    class InterruptedImport:  # Ctrl-C arrives while the invoked command (and torch) loads
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "mergekit_like.cli.verify_cmd":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "mergekit_like.cli.verify_cmd", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["mergekit-like", "--debug", "verify", "somewhere"])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"
