"""The files beside the weights that make an output directory ready to load."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io.dtypes import dtype_name

logger = logging.getLogger(__name__)

CONFIG = "config.json"
# The tokenizer's files (mergekit's --no-copy-tokenizer leaves them out).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
COPIED_AS_IS = ("generation_config.json", *TOKENIZER_FILES, "preprocessor_config.json")
# transformers < 4.56 writes "torch_dtype"; newer versions write "dtype".
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")


def has_config(source: str | Path) -> bool:
    """Whether ``source`` (a side-file source directory) gives its outputs a ``config.json``."""
    return (Path(source) / CONFIG).is_file()


def copy_side_files(
    source: str | Path, destination: str | Path, out_dtype: torch.dtype | None, *, tokenizer: bool = True,
) -> list[str]:
    """Copies config, generation config and (unless not ``tokenizer``) tokenizer files from ``source``.

    The config's dtype field is set to ``out_dtype``. Returns the names copied.
    A source that is a single weights file has no side files; nothing is copied.
    """
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        return []
    copied = []
    config_path = source / CONFIG
    if config_path.is_file():
        _write_config(config_path, destination / CONFIG, out_dtype)
        copied.append(CONFIG)
    for name in COPIED_AS_IS:
        if (source / name).is_file() and (tokenizer or name not in TOKENIZER_FILES):
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def read_config(source: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a model directory as a mapping; None when it has none.

    A config that cannot be read (bad JSON, not a mapping) is an :class:`InvalidCheckpointError`:
    a caller that asks for it needs what it says (the layer count, the architecture).
    """
    path = Path(source) / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidCheckpointError(f"config is not valid JSON ({type(exc).__name__})", path=path,
                                     fix="repair or replace the model's config.json") from None
    except RecursionError:
        raise _nested_too_deeply(path) from None
    if not isinstance(config, dict):
        raise InvalidCheckpointError("config is not a JSON object", path=path,
                                     fix="repair or replace the model's config.json")
    return config


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object (an adapter's or a tokenizer's config): one clear error otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidCheckpointError(f"the {what} cannot be read ({type(exc).__name__})", path=path, fix=fix) from None
    except RecursionError:
        raise _nested_too_deeply(path) from None
    if not isinstance(data, dict):
        raise InvalidCheckpointError(f"the {what} is not a JSON object", path=path, fix=fix)
    return data


def _write_config(source: Path, destination: Path, out_dtype: torch.dtype | None) -> None:
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except ValueError:
        # Bad JSON, bad UTF-8, and integers past Python's digit limit (valid JSON) all land here.
        logger.warning("%s is not valid JSON; copied unchanged", source)
        shutil.copyfile(source, destination)
        return
    except RecursionError:
        raise _nested_too_deeply(source) from None
    write_config(destination.parent, config, out_dtype)


def write_config(directory: Path, config: Any, out_dtype: torch.dtype | None = None) -> Path:
    """Writes ``config.json`` into ``directory``; a mapping gets its dtype field set to ``out_dtype``.

    The one writer of config.json: read from a model, kept by the training hook, or made
    for an example (a source config that is not valid JSON is copied as it is, unread).
    """
    config = config_with_dtype(_standard_json(dict(config) if isinstance(config, Mapping) else config, ""),
                               out_dtype)
    path = Path(directory) / CONFIG
    path.write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    return path


def config_with_dtype(config: Any, dtype: torch.dtype | None) -> Any:
    """A copy of a config mapping whose dtype field says ``dtype`` (None, or not a mapping: as it is).

    A Hugging Face config (it has model_type) gets the dtype key transformers reads; any other
    config keeps its keys, since a strict loader may refuse one it does not know.
    """
    if not isinstance(config, Mapping) or dtype is None:
        return config
    config = dict(config)
    present = [k for k in CONFIG_DTYPE_KEYS if k in config]
    if not present and "model_type" in config:
        present = ["torch_dtype"]
    for key in present:
        config[key] = dtype_name(dtype)
    return config


def _standard_json(value: Any, where: str) -> Any:
    """``value`` with NaN and infinities (which Python's json reads, but JSON has not) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        logger.warning("%s: %s is %r, which JSON cannot hold; written as null", CONFIG, where or "the value", value)
        return None
    if isinstance(value, dict):
        return {k: _standard_json(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_standard_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _nested_too_deeply(source: Path) -> InvalidCheckpointError:
    return InvalidCheckpointError(
        "config is nested too deeply to read", path=source,
        fix="repair or replace the source model's config.json (transformers configs are a few levels deep)",
    )
