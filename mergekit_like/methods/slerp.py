"""Spherical linear interpolation between the base and one other model.

Its coefficients need the two tensors' norms and their cosine; mergekit reduces them in flat
chunks of 2**20 entries, so a large tensor merges in row blocks after two passes over them (the
chunks' norms, then their normalised dot products, each chunk joined across blocks where it
straddles two) with the whole tensor's bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from mergekit_like.methods.declaration import Typical, merge_method
from mergekit_like.methods.flat_units import UnitReducer, UnitStream, unit_count

# Colinear vectors (|cos| above this) are interpolated linearly: slerp is ill-conditioned there.
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
# mergekit reduces tensors over 2**20 elements chunk by chunk; summing in the same
# chunks gives its numbers to the last bit on large tensors too.
CHUNK = 1024 * 1024
# mergekit does not clamp t (nor do we: its numbers are ours), but outside [0, 1] the result is no
# longer between the two models.
INTERPOLATES = Typical(0, 1, why="extrapolates beyond the two models when t is outside [0, 1] "
                                "(past the base below 0, past the other model above 1); mergekit computes the same")


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(CHUNK)) if x.numel() else [x]


def norm_of_chunks(chunk_norms: torch.Tensor) -> torch.Tensor:
    """A vector's norm from its chunks' norms; a (near) zero norm is 1, so normalising leaves it alone."""
    norm = torch.linalg.vector_norm(chunk_norms)
    return torch.where(norm > NORM_EPS, norm, 1)


def chunk_dot(a: torch.Tensor, b: torch.Tensor, norm0: torch.Tensor, norm1: torch.Tensor) -> torch.Tensor:
    """One chunk's share of the cosine."""
    return ((a / norm0) * (b / norm1)).sum()


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of ``v0`` and ``v1`` (flat, in the working dtype) in the interpolation at ``t``."""
    norm0 = norm_of_chunks(torch.stack([torch.linalg.vector_norm(c) for c in _chunks(v0)]))
    norm1 = norm_of_chunks(torch.stack([torch.linalg.vector_norm(c) for c in _chunks(v1)]))
    dot = torch.stack([chunk_dot(a, b, norm0, norm1) for a, b in zip(_chunks(v0), _chunks(v1))])
    return coefficients_at(dot, t)


def coefficients_at(chunk_dots: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the two vectors from their chunks' shares of the cosine."""
    dot = chunk_dots.sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return 1 - t, t
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SlerpReduction:
    """The chunks' norms (first pass) and shares of the cosine (second pass) of one tensor's row blocks."""

    def __init__(self, t: float, numel: int, device: torch.device) -> None:
        self.t = t
        self.numel = numel
        self.chunks = unit_count(numel, CHUNK)
        self.device = device
        self.norms: list[torch.Tensor] = []  # of the base and the other model, per chunk
        self.dots: torch.Tensor | None = None
        self.stream: UnitStream | None = None
        self.coefficients: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        dtype = _working_dtype(base.dtype)
        if self.stream is None:
            self.stream = UnitStream(CHUNK, self.numel)
            if pass_index == 0:
                self.norms = [torch.empty(self.chunks, dtype=dtype, device=self.device) for _ in range(2)]
            else:
                self.dots = torch.empty(self.chunks, dtype=dtype, device=self.device)
        self.stream.add([base.reshape(-1).to(dtype), models[0].reshape(-1).to(dtype)], self._reducer(pass_index))

    def _reducer(self, pass_index: int) -> UnitReducer:
        return self._norms if pass_index == 0 else self._dots

    def _norms(self, index: int, chunk: Sequence[torch.Tensor]) -> None:
        for norms, values in zip(self.norms, chunk):
            norms[index] = torch.linalg.vector_norm(values)

    def _dots(self, index: int, chunk: Sequence[torch.Tensor]) -> None:
        assert self.dots is not None
        self.dots[index] = chunk_dot(chunk[0], chunk[1], self.norm0, self.norm1)

    def end_pass(self, pass_index: int) -> None:
        assert self.stream is not None
        self.stream.finish(self._reducer(pass_index))
        self.stream = None
        if pass_index == 0:
            self.norm0, self.norm1 = (norm_of_chunks(n) for n in self.norms)
        else:
            assert self.dots is not None
            self.coefficients = coefficients_at(self.dots, torch.tensor(self.t, dtype=self.dots.dtype,
                                                                       device=self.device))

    def block(self, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.coefficients is None:
            raise RuntimeError("slerp's row blocks need both passes over the tensor first")
        return self.coefficients


@dataclass(frozen=True)
class SlerpPass:
    """The tensor pass of slerp: its two coefficients, from two passes over the row blocks."""

    keyword: str = "block_coefficients"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        return True

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return 2

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _SlerpReduction:
        return _SlerpReduction(params["t"], numel, device)


@merge_method(
    "slerp",
    paper="https://en.wikipedia.org/wiki/Slerp",
    description="Spherical interpolation from the base (t=0) to the other model (t=1).",
    min_models=1,
    max_models=1,
    tensor_pass=SlerpPass(),
)
def slerp(tensors: list[torch.Tensor], *, base: torch.Tensor, t: Annotated[float, INTERPOLATES],
          block_coefficients: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    (other,) = tensors
    if base.numel() == 0:
        return base.clone()
    if block_coefficients is not None:
        c0, c1 = block_coefficients  # a row block: from the passes over the whole tensor
    else:
        dtype = _working_dtype(base.dtype)
        c0, c1 = slerp_coefficients(base.reshape(-1).to(dtype), other.reshape(-1).to(dtype),
                                    torch.tensor(t, dtype=dtype, device=base.device))
    return _interpolated(c0, c1, base, other)


def _interpolated(c0: torch.Tensor, c1: torch.Tensor, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``c0 * base + c1 * other`` in the working dtype, written in the base's, a chunk at a time on the
    CPU (the float32 temporaries of a row block stay a chunk's)."""
    dtype = c0.dtype
    flat0, flat1 = base.reshape(-1), other.reshape(-1)
    out = torch.empty(flat0.shape, dtype=base.dtype, device=base.device)
    step = CHUNK if base.device.type == "cpu" else max(1, flat0.numel())
    for start in range(0, flat0.numel(), step):
        part = slice(start, start + step)
        out[part] = c0 * flat0[part].to(dtype) + c1 * flat1[part].to(dtype)
    return out.reshape(base.shape)
