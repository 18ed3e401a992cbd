"""matplotlib for the plots of any command, imported only when a plot is asked for."""

from __future__ import annotations

from types import ModuleType

from mergekit_like.errors import OptionsError


def require_matplotlib() -> ModuleType:
    """pyplot, on a backend that needs no display; a one-line error when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise OptionsError(["plots need matplotlib: pip install matplotlib"]) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
