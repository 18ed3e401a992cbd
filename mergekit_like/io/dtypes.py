"""The dtypes safetensors stores, mapped to torch's, and user-facing dtype names."""

from __future__ import annotations

from pathlib import Path

import torch

from mergekit_like.errors import UnsupportedDtypeError


def _optional(name: str) -> torch.dtype | None:
    # Older torch builds lack some float8 and unsigned types; skip them quietly.
    return getattr(torch, name, None)


_CANDIDATES: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": _optional("uint16"),
    "I32": torch.int32,
    "U32": _optional("uint32"),
    "I64": torch.int64,
    "U64": _optional("uint64"),
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": _optional("float8_e4m3fn"),
    "F8_E5M2": _optional("float8_e5m2"),
    "F8_E8M0": _optional("float8_e8m0fnu"),
}

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {k: v for k, v in _CANDIDATES.items() if v is not None}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Dtypes the safetensors format defines that this torch build cannot hold.
KNOWN_BUT_UNSUPPORTED = {"F4", "F6_E2M3", "F6_E3M2", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}

_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def to_torch(code: str, *, path: str | Path | None = None, tensor: str | None = None) -> torch.dtype:
    """Maps a safetensors dtype code (``"BF16"``) to a torch dtype, or says why it cannot."""
    try:
        return SAFETENSORS_TO_TORCH[code]
    except KeyError:
        if code in KNOWN_BUT_UNSUPPORTED:
            what = f"dtype {code} is valid safetensors but this torch build ({torch.__version__}) cannot hold it"
            fix = "upgrade torch, or convert the checkpoint to a supported dtype"
        else:
            what = f"unknown dtype {code!r}"
            fix = f"safetensors dtypes are {', '.join(sorted(SAFETENSORS_TO_TORCH))}"
        raise UnsupportedDtypeError(what, path=path, tensor=tensor, fix=fix) from None


def to_safetensors(dtype: torch.dtype, *, tensor: str | None = None) -> str:
    """Maps a torch dtype to its safetensors code, or says it has none."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"torch dtype {dtype} has no safetensors equivalent",
            tensor=tensor,
            fix="cast the tensor to a supported dtype first",
        ) from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Reads a user-given float dtype such as ``bfloat16``, ``bf16`` or ``torch.float16``."""
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    raise UnsupportedDtypeError(
        f"unknown dtype name {name!r}",
        fix="use one of float32, float16, bfloat16, float64 (or fp32, fp16, bf16)",
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the form config.json uses."""
    return str(dtype).removeprefix("torch.")
