"""Shared framework for the evidence studies.

Everything here runs on CPU from data that ships with the machine, with no
downloads:

* **Domains** (byte-level tokens, vocabulary 256). Each domain is a set of
  files; every file goes to ``train`` / ``val`` / ``test`` by a hash of its path
  relative to the domain root (buckets 0-79 / 80-89 / 90-99 of
  ``sha1(domain:relpath) % 100``), so the split is deterministic and
  file-level. Files whose contents are byte-identical to an earlier file (in
  hash order) are dropped, each file is truncated to ``MAX_FILE_BYTES``, and
  files are concatenated in hash order, separated by a NUL byte, until the
  split's byte cap is reached.

  - ``python`` (domain A): ``*.py`` under ``sysconfig.get_paths()["stdlib"]``,
    excluding ``site-packages``.
  - ``licenses`` (domain B): ``/usr/share/common-licenses/*`` and
    ``/usr/share/doc/*/copyright``.
  - ``c_headers`` (domain C): ``*.h`` under ``/usr/include``.

* **Model**: a tiny GPT-style decoder (pre-LayerNorm, learned positions,
  untied head), saved as a Hugging Face-style directory: ``model.safetensors``
  plus ``config.json``; loaded back with the project's own
  ``mergekit_like.io.open_checkpoint`` so merged/souped outputs (any shard
  layout) load the same way.

* **Training / evaluation**: AdamW, linear warm-up then cosine decay, gradient
  clipping 1.0, random windows drawn with a seeded generator;
  ``torch.set_num_threads(2)``. Evaluation is the mean next-byte cross-entropy
  (nats/byte) over fixed, non-overlapping windows of a held-out split.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"

MAX_FILE_BYTES = 16 * 1024
SPLIT_CAPS = {"train": 3_000_000, "val": 300_000, "test": 300_000}
DOMAIN_ALIASES = {"A": "python", "B": "licenses", "C": "c_headers"}


# --------------------------------------------------------------------------- data
def _domain_files(name: str) -> list[tuple[str, Path]]:
    """(key, path) pairs of one domain; the key is the path relative to its root."""
    out: list[tuple[str, Path]] = []
    if name == "python":
        root = Path(sysconfig.get_paths()["stdlib"])
        for p in root.rglob("*.py"):
            rel = p.relative_to(root).as_posix()
            if "site-packages" in rel.split("/"):
                continue
            out.append((rel, p))
    elif name == "licenses":
        lic = Path("/usr/share/common-licenses")
        if lic.is_dir():
            out += [(f"common-licenses/{p.name}", p) for p in lic.iterdir()]
        doc = Path("/usr/share/doc")
        if doc.is_dir():
            out += [(f"doc/{p.parent.name}/copyright", p) for p in doc.glob("*/copyright")]
    elif name == "c_headers":
        root = Path("/usr/include")
        out += [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.h")]
    else:
        raise ValueError(f"unknown domain {name!r} (python, licenses, c_headers or A, B, C)")
    return [(k, p) for k, p in out if p.is_file()]


def _bucket(domain: str, key: str) -> int:
    return int(hashlib.sha1(f"{domain}:{key}".encode()).hexdigest()[:8], 16) % 100


def split_of(bucket: int) -> str:
    return "train" if bucket < 80 else ("val" if bucket < 90 else "test")


@functools.cache
def domain_info(name: str) -> dict[str, dict[str, int]]:
    """Files and bytes per split (after dedup, truncation and caps)."""
    load_split(name, "train")
    return _INFO[name]


_INFO: dict[str, dict[str, dict[str, int]]] = {}


@functools.cache
def _load_domain(name: str) -> dict[str, bytes]:
    files = sorted(_domain_files(name), key=lambda kp: hashlib.sha1(f"{name}:{kp[0]}".encode()).hexdigest())
    seen: set[str] = set()
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    size = {"train": 0, "val": 0, "test": 0}
    count = {"train": 0, "val": 0, "test": 0}
    for key, path in files:
        split = split_of(_bucket(name, key))
        if size[split] >= SPLIT_CAPS[split]:
            continue
        try:
            data = path.read_bytes()[:MAX_FILE_BYTES]
        except OSError:
            continue
        digest = hashlib.sha1(data).hexdigest()
        if not data or digest in seen:
            continue
        seen.add(digest)
        data = data[: SPLIT_CAPS[split] - size[split]]
        parts[split].append(data)
        size[split] += len(data) + 1
        count[split] += 1
    _INFO[name] = {s: {"files": count[s], "bytes": len(b"\0".join(parts[s]))} for s in parts}
    return {s: b"\0".join(parts[s]) for s in parts}


def resolve_domain(name: str) -> str:
    return DOMAIN_ALIASES.get(name, name)


@functools.cache
def load_split(domain: str, split: str) -> torch.Tensor:
    """A split's bytes as a uint8 tensor (the token ids)."""
    data = _load_domain(resolve_domain(domain))[split]
    if len(data) < 10_000:
        raise RuntimeError(f"domain {domain} split {split} has only {len(data)} bytes on this machine")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


# --------------------------------------------------------------------------- model
@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_ctx: int = 64
    d_model: int = 128
    n_layer: int = 3
    n_head: int = 4
    model_type: str = "tiny_byte_gpt"


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def new_model(seed: int, cfg: GPTConfig | None = None) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(cfg or GPTConfig())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: TinyGPT, directory: str | Path) -> Path:
    """Writes ``DIR/model.safetensors`` and ``DIR/config.json`` (Hugging Face layout)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")
    return directory


def load_model(directory: str | Path) -> TinyGPT:
    """Loads a model directory (any shard layout) through ``mergekit_like.io.open_checkpoint``."""
    from mergekit_like.io import open_checkpoint

    directory = Path(directory)
    cfg_path = directory / "config.json"
    raw = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    # merged outputs' config.json may carry extra keys (the tool records torch_dtype, as mergekit does)
    cfg = GPTConfig(**{k: v for k, v in raw.items() if k in GPTConfig.__dataclass_fields__})
    model = TinyGPT(cfg)
    with open_checkpoint(directory) as ckpt:
        state = {name: ckpt.read(name).to(torch.float32) for name in ckpt.names()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


# --------------------------------------------------------------------------- train / eval
@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 30
    batch: int = 32
    weight_decay: float = 0.1
    min_lr_frac: float = 0.1
    seed: int = 0


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def sample_batch(data: torch.Tensor, batch: int, n_ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - n_ctx - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(n_ctx + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def train(
    model: TinyGPT,
    domain: str,
    cfg: TrainConfig,
    log_every: int = 0,
    *,
    after_step: Callable[[int], None] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    replay: torch.Tensor | None = None,
    replay_per_batch: int = 0,
) -> list[float]:
    """Trains in place on ``domain``'s train split; returns the training losses.

    ``after_step(step)`` runs after each optimizer step (1-based: a hook's ``step()``,
    checkpoint saves); ``penalty()`` is added to each step's loss (e.g. an L2 pull toward
    earlier weights); ``replay_per_batch`` of each batch's windows come from the ``replay``
    bytes instead of the domain (a replay buffer of earlier tasks).
    """
    data = load_split(domain, "train")
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x, y = sample_batch(data, cfg.batch - replay_per_batch, model.cfg.n_ctx, gen)
        if replay is not None and replay_per_batch:
            rx, ry = sample_batch(replay, replay_per_batch, model.cfg.n_ctx, gen)
            x, y = torch.cat([x, rx]), torch.cat([y, ry])
        loss = F.cross_entropy(model(x).reshape(-1, model.cfg.vocab_size), y.reshape(-1))
        objective = loss + penalty() if penalty is not None else loss
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step(step + 1)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{cfg.steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


EVAL_WINDOWS = 512


@torch.no_grad()
def evaluate(model: TinyGPT, domain: str, split: str = "test", max_windows: int = EVAL_WINDOWS,
             batch: int = 64) -> float:
    """Mean next-byte cross-entropy (nats/byte) over fixed non-overlapping windows of a split."""
    data = load_split(domain, split)
    n = model.cfg.n_ctx + 1
    total_windows = len(data) // n
    count = min(max_windows, total_windows)
    # evenly spaced windows over the whole split, so every part of it is represented
    starts = torch.linspace(0, (total_windows - 1) * n, count).long()
    starts = (starts // n) * n
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, count, batch):
        idx = starts[i:i + batch, None] + torch.arange(n)[None, :]
        chunk = data[idx].long()
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, model.cfg.vocab_size), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        tokens += chunk[:, 1:].numel()
    return total / tokens


def describe_domains(names: tuple[str, ...] = ("python", "licenses", "c_headers")) -> str:
    """A markdown table of the domains' files and bytes per split on this machine."""
    lines = ["| domain | source | train files / bytes | val files / bytes | test files / bytes |",
             "|---|---|---|---|---|"]
    sources = {"python": "stdlib `*.py` (no site-packages)",
               "licenses": "`/usr/share/common-licenses/*`, `/usr/share/doc/*/copyright`",
               "c_headers": "`/usr/include/**/*.h`"}
    for name in names:
        try:
            info = domain_info(name)
        except RuntimeError as exc:
            lines.append(f"| {name} | {sources[name]} | unavailable: {exc} | | |")
            continue
        cells = [f"{info[s]['files']} / {info[s]['bytes']:,}" for s in ("train", "val", "test")]
        lines.append(f"| {name} | {sources[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # quick self-check: domain sizes, parameter count and step time
    print(describe_domains())
    m = new_model(0)
    print(f"parameters: {num_params(m):,}")
    t = time.perf_counter()
    train(m, "python", TrainConfig(steps=20, lr=1e-3, warmup=5))
    print(f"train step: {(time.perf_counter() - t) / 20 * 1000:.0f} ms")
    t = time.perf_counter()
    print(f"eval python/test: {evaluate(m, 'python'):.3f} in {time.perf_counter() - t:.2f}s")


# -- running the tool's CLI ------------------------------------------------------------


def cli() -> str:
    exe = Path(sys.executable).with_name("mergekit-like")
    if exe.exists():
        return str(exe)
    found = shutil.which("mergekit-like")
    if not found:
        sys.exit("mergekit-like is not installed next to this Python nor on PATH")
    return found


def run_cli(args: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run([cli(), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mergekit-like {' '.join(args[:2])} ... failed (exit {done.returncode}):\n"
                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


# -- what every study's command line shares ------------------------------------------------


def study_parser(description: str) -> argparse.ArgumentParser:
    """The options every study has: seeds, --quick, --workdir, --out, --replot."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (smoke test)")
    parser.add_argument("--workdir", type=Path, help="where models are written (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the saved .json")
    return parser


@contextlib.contextmanager
def workdir(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given``, or a temporary directory removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def saved(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


def publish(out: Path, stem: str, data: dict, text: str, plot: Callable[[Path], None], *,
            save_json: bool = True) -> None:
    """Writes STEM.md, STEM.png and (unless replotting) STEM.json into ``out`` and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    if save_json:
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(out / f"{stem}.png")
    print("\n" + text)
    print(f"wrote {out / stem}.md and .png" + (" and .json" if save_json else ""))


def study_data(args: argparse.Namespace, stem: str, key: str, run: Callable[[Path], list],
               **settings: object) -> dict:
    """The saved results (``--replot``), or ``{"meta": run_meta(...), key: run(work)}`` of a fresh
    run in ``--workdir`` (or a temporary directory)."""
    if args.replot:
        return saved(args.out, stem)
    started = time.perf_counter()
    with workdir(args.workdir, f"{stem}-") as work:
        results = run(work)
    return {"meta": run_meta(started, **settings), key: results}


def run_meta(started: float, **settings: object) -> dict:
    """What every study records beside its settings: model size and shape, wall time, threads, torch."""
    return {"params": num_params(new_model(0)), "cfg": vars(GPTConfig()), **settings,
            "wall_s": time.perf_counter() - started, "threads": torch.get_num_threads(), "torch": torch.__version__}
