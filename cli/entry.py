"""The console script's entry point: imports the application only inside its guard.

Importing the commands imports torch (seconds on a cold cache). A Ctrl-C then lands
inside the import machinery: as a KeyboardInterrupt traceback, or, inside a C
extension's initialisation, as an unrelated ImportError. Both are one line here.
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
        from mergekit_like.cli.main import main as run
    except BaseException:
        if interrupted or isinstance(sys.exc_info()[1], KeyboardInterrupt):
            _exit_interrupted()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:  # a library that imports with a bare except swallowed the interrupt
        _exit_interrupted()
    try:
        run()
    except KeyboardInterrupt:
        _exit_interrupted()


def _exit_interrupted() -> None:
    sys.stderr.write(INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)
