"""Imports every built-in method module once, so their decorators register them."""

from mergekit_like.methods import (  # noqa: F401
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    uniform_soup,
    wise_ft,
)
