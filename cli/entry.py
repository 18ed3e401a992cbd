"""The console script's entry point: imports the application only inside its guard.

Importing a command imports torch (seconds on a cold cache). A Ctrl-C then lands
inside the import machinery: as a KeyboardInterrupt traceback, or, inside a C
extension's initialisation, as an unrelated ImportError. Both are one line here.
The app itself imports no command (``--help`` needs none); the one invoked is
imported here, inside the guard.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted; nothing was written\n"


def main() -> None:
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        from mergekit_like.cli.main import import_invoked_command
        from mergekit_like.cli.main import main as run
        from mergekit_like.cli.output import SESSION

        import_invoked_command(sys.argv[1:])
    except BaseException:
        signal.signal(signal.SIGINT, previous)
        if interrupted or isinstance(sys.exc_info()[1], KeyboardInterrupt):
            _exit_interrupted()
        raise
    if interrupted:  # a library that imports with a bare except swallowed the interrupt
        _exit_interrupted()
    try:
        run()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as leaving:
        # Typer turns a Ctrl-C outside a command (while it parses, or prints the help) into a silent
        # exit 130; a command says so itself.
        if interrupted and leaving.code == EXIT_INTERRUPTED and not SESSION.interrupt_reported:
            _exit_interrupted()
        raise
    except Exception:
        # A module a command imports as it runs, interrupted in its initialisation (an ImportError).
        if interrupted:
            _exit_interrupted()
        raise
    finally:
        # The work is done and the process is leaving: a Ctrl-C now would only kill the interpreter's
        # shutdown by the signal (exit -2), after a complete run.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _exit_interrupted() -> None:
    sys.stderr.write(INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)
