"""A LoRA adapter extracted from a fine-tune: each weight's change cut to low rank by its SVD.

For a Linear weight, ``delta = finetuned - base`` (in float32) is approximated by its truncated
SVD ``U_r S_r V_r^T``, written as ``lora_B = U_r S_r`` (out, r) and ``lora_A = V_r^T`` (r, in)
with ``lora_alpha = r``: PEFT's scaling ``alpha / r`` is 1, so ``B @ A`` is the truncated SVD
itself, the best rank-r approximation (Eckart-Young), and a change of rank r comes back to
float32 rounding. Input embeddings are cut as ``delta.T``, PEFT's ``lora_embedding_B`` (dim, r)
and ``lora_embedding_A`` (r, tokens); GPT-2's Conv1D weights, stored (in, out), as ``delta.T``
too, into ``lora_A`` / ``lora_B`` with ``fan_in_fan_out``.

One tensor of each model is read at a time. The factors (the adapter itself) are kept until
every rank is known, then written in one file with the tensors saved whole, read again.
"""

from __future__ import annotations

import fnmatch
import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergekit_like.adapters.layers import is_conv1d
from mergekit_like.adapters.writer import AdapterContents, adapter_config, is_causal_lm, write_adapter
from mergekit_like.card import CARD_FILE, CardContent, render_card
from mergekit_like.errors import IncompatibleModelsError, OptionsError, printable, short_repr
from mergekit_like.io.atomic import check_target
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.outputs import refuse_output_among_inputs
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.sidefiles import read_config
from mergekit_like.merge.engine import resolve_device
from mergekit_like.progress import NullProgress, ProgressSink
from mergekit_like.vocab.tensors import EMBEDDING_SUFFIXES, HEAD_SUFFIXES, TOP_LEVEL_HEADS

EmbeddingMode = Literal["lora", "save", "skip"]
NormMode = Literal["save", "skip"]
Kind = Literal["lora", "embedding"]  # PEFT's lora_A/B, or lora_embedding_A/B (the transposed delta)
# nn.Embedding layers that EMBEDDING_SUFFIXES (token embeddings) leaves out.
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings", "token_type_embeddings")


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how; every problem is reported at once on construction."""

    rank: int | None = None  # the largest rank of any module; None only with energy
    energy: float | None = None  # keep the fewest singular values whose squares reach this share of the total
    targets: tuple[str, ...] = ()  # module-name patterns (substring, or fnmatch with * ? [); none: every Linear
    embeddings: EmbeddingMode = "save"  # embeddings and the head whole: mergekit-extract-lora's default
    norms: NormMode = "save"  # a few numbers per layer, and a fine-tune's norms do matter
    dtype: torch.dtype | None = None  # None: the factors in their base weight's dtype
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    fast: bool = False  # randomized SVD (svd_lowrank): for large matrices and small ranks
    oversample: int = 10  # extra columns of the random sketch: its accuracy for the smallest kept values
    niter: int = 2  # power iterations of the sketch (svd_lowrank's default)

    def __post_init__(self) -> None:
        problems = []
        if self.rank is None and self.energy is None:
            problems.append("give --rank, --energy, or both")
        if self.rank is not None and self.rank < 1:
            problems.append(f"the rank must be at least 1, not {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            problems.append(f"--energy must be in (0, 1], not {self.energy}")
        if self.fast and self.rank is None:
            problems.append("--fast needs --rank: the randomized SVD finds only rank + oversample values")
        if self.oversample < 0 or self.niter < 0:
            problems.append("--oversample and --niter must be 0 or more")
        if self.embeddings not in ("lora", "save", "skip"):
            problems.append(f"--embeddings must be lora, save or skip, not {short_repr(self.embeddings)}")
        if self.norms not in ("save", "skip"):
            problems.append(f"--norms must be save or skip, not {short_repr(self.norms)}")
        if problems:
            raise OptionsError(problems)


# -- the kernel -------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """``b @ a`` approximates the matrix: ``b = U_r S_r``, ``a = V_r^T``."""

    b: torch.Tensor
    a: torch.Tensor
    kept: float  # sum of the kept squared singular values
    total: float  # the squared Frobenius norm of the matrix


def low_rank(matrix: torch.Tensor, *, rank: int | None, energy: float | None, sketch: int | None = None,
             niter: int = 2, seed: int = 0) -> LowRank:
    """The truncated SVD of a float ``matrix``: ``rank`` values, or fewer where ``energy`` is reached.

    ``sketch`` columns: the randomized SVD, where the matrix is at least twice as wide (smaller ones
    get the exact SVD, no slower there); ``seed`` makes its random sketch reproducible.
    """
    total = float(torch.linalg.vector_norm(matrix, dtype=torch.float64) ** 2)
    u, s, vh = _svd(matrix, sketch, niter, seed)
    r = kept_rank(s, total, rank, energy)
    return LowRank(u[:, :r] * s[:r], vh[:r], float((s[:r].double() ** 2).sum()), total)


def kept_rank(s: torch.Tensor, total: float, rank: int | None, energy: float | None) -> int:
    """The fewest leading values of ``s`` whose squares reach ``energy`` of ``total``, at most ``rank``."""
    r = s.shape[0] if rank is None else min(rank, s.shape[0])
    if energy is not None:
        cumulative = torch.cumsum(s.double() ** 2, 0)
        reached = int(torch.searchsorted(cumulative, torch.tensor(energy * total, dtype=torch.float64,
                                                                  device=s.device)))
        r = min(r, reached + 1)  # beyond the last value (rounding, or a sketch): all of them
    return max(r, 1)


def _svd(matrix: torch.Tensor, sketch: int | None, niter: int,
         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sketch is None or 2 * sketch > min(matrix.shape):
        return torch.linalg.svd(matrix, full_matrices=False)
    cuda = [matrix.device.index or 0] if matrix.device.type == "cuda" else []
    # svd_lowrank draws from the global generator: seeded inside, restored after.
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=sketch, niter=niter)
    return u, s, v.T


# -- which tensors become what ------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionPlan:
    """What each tensor becomes, decided from the headers alone."""

    lora: dict[str, Kind]  # weight name -> how it is decomposed
    conv1d: frozenset[str]  # weights of GPT-2's Conv1D layers, stored (in, out): their transpose is decomposed
    saved: dict[str, tuple[str, ...]]  # module -> its tensors, saved whole (modules_to_save) if one changed
    others: tuple[str, ...]  # tensors the adapter leaves as they are (reported when they changed)


def plan_extraction(base: Checkpoint, finetuned: Checkpoint, options: ExtractOptions) -> ExtractionPlan:
    """Refuses models whose tensors differ in name or shape; sorts the rest into LoRA, saved and left out."""
    check_same_tensors(base, finetuned)
    config = read_config(finetuned.layout.root)
    lora: dict[str, Kind] = {}
    saved: dict[str, tuple[str, ...]] = {}
    others: list[str] = []
    for module, names in _by_module(finetuned).items():
        weight = module + ".weight"
        role = _role(finetuned, module, names)
        if role == "embedding" or role == "head":
            if options.embeddings == "lora":
                lora[weight] = "embedding" if role == "embedding" else "lora"
                others += [n for n in names if n != weight]
            elif options.embeddings == "save":
                saved[module] = names
            else:
                others += names
        elif role == "linear" and selected(module, options.targets):
            lora[weight] = "lora"
            others += [n for n in names if n != weight]  # a bias: PEFT's lora_bias is not written
        elif role == "norm" and options.norms == "save":
            saved[module] = names
        else:
            others += names
    conv1d = frozenset(w for w, kind in lora.items() if kind == "lora" and is_conv1d(config, w.removesuffix(".weight")))
    return ExtractionPlan(lora, conv1d, saved, tuple(others))


def check_same_tensors(base: Checkpoint, finetuned: Checkpoint) -> None:
    """Both models have the same tensor names and shapes, or one line names the first difference."""
    fix = "extract from a fine-tune of this base (same architecture and sizes)"
    for name in finetuned.names():
        if name not in base:
            raise IncompatibleModelsError(f"the fine-tune has it but the base {base.layout.source} does not",
                                          path=finetuned.layout.source, tensor=name, fix=fix)
        shapes = list(base.entry(name).shape), list(finetuned.entry(name).shape)
        if shapes[0] != shapes[1]:
            raise IncompatibleModelsError(f"shape {shapes[1]} in the fine-tune but {shapes[0]} in the base "
                                          f"{base.layout.source}", path=finetuned.layout.source, tensor=name,
                                          fix=fix)
    missing = [n for n in base.names() if n not in finetuned]
    if missing:
        raise IncompatibleModelsError(f"the base has it but the fine-tune {finetuned.layout.source} does not",
                                      path=base.layout.source, tensor=missing[0], fix=fix)


def selected(module: str, patterns: Sequence[str]) -> bool:
    """Whether ``--target`` patterns pick ``module``: a substring, or an fnmatch pattern of the whole name."""
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(module, p) if any(c in p for c in "*?[") else p in module for p in patterns)


def _by_module(checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]:
    modules: dict[str, list[str]] = {}
    for name in checkpoint.names():
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    return {m: tuple(names) for m, names in modules.items()}


def _role(checkpoint: Checkpoint, module: str, names: Sequence[str]) -> str:
    """embedding, head, linear (a 2-D float weight), norm (only 1-D float tensors) or other."""
    entries = [checkpoint.entry(n) for n in names]
    if not all(e.dtype.is_floating_point for e in entries):
        return "other"
    weight = module + ".weight"
    if weight in names and len(checkpoint.entry(weight).shape) == 2:
        if weight.endswith(EMBEDDING_SUFFIXES) or module.rpartition(".")[2] in POSITION_EMBEDDINGS:
            return "embedding"
        if weight.endswith(HEAD_SUFFIXES) or weight in TOP_LEVEL_HEADS:
            return "head"
        return "linear"
    return "norm" if all(len(e.shape) == 1 for e in entries) else "other"


# -- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleReport:
    """How well one module's change is held by its factors."""

    module: str
    kind: Kind
    rank: int
    energy: float  # the kept singular values' share of ||delta||^2
    error: float  # ||delta - B A|| / ||delta||, with B and A as stored
    norm: float  # ||delta||


@dataclass(frozen=True)
class TypeSummary:
    """Modules of one type (their last name part: q_proj, ...), weighted by their changes' squared norms."""

    modules: int
    ranks: tuple[int, int]  # smallest, largest
    energy: float
    error: float


@dataclass(frozen=True)
class ExtractionResult:
    """What was written, and how close the adapter is to the change."""

    output: Path
    modules: tuple[ModuleReport, ...]
    saved: tuple[str, ...]  # modules saved whole (modules_to_save)
    left_out: tuple[str, ...]  # tensors that changed but that the adapter leaves as in the base
    unchanged: int  # tensors equal in both models (nothing to extract)
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as written

    def by_type(self) -> dict[str, TypeSummary]:
        groups: dict[str, list[ModuleReport]] = {}
        for report in self.modules:
            groups.setdefault(report.module.rpartition(".")[2], []).append(report)
        return {kind: _summary(reports) for kind, reports in groups.items()}

    def overall(self) -> TypeSummary | None:
        return _summary(list(self.modules)) if self.modules else None

    def to_dict(self) -> dict[str, Any]:
        overall = self.overall()
        return {
            "output": str(self.output),
            "overall": _summary_dict(overall) if overall else None,
            "by_type": {k: _summary_dict(v) for k, v in self.by_type().items()},
            "modules": [{"module": m.module, "kind": m.kind, "rank": m.rank, "energy": m.energy,
                         "relative_error": m.error} for m in self.modules],
            "saved": list(self.saved), "left_out": list(self.left_out), "unchanged": self.unchanged,
            "r": self.config.get("r"), "rank_pattern": self.config.get("rank_pattern"),
        }


def _summary(reports: Sequence[ModuleReport]) -> TypeSummary:
    total = sum(r.norm ** 2 for r in reports)
    kept = sum(r.energy * r.norm ** 2 for r in reports)
    missed = sum((r.error * r.norm) ** 2 for r in reports)
    ranks = [r.rank for r in reports]
    return TypeSummary(len(reports), (min(ranks), max(ranks)), kept / total, math.sqrt(missed / total))


def _summary_dict(summary: TypeSummary) -> dict[str, Any]:
    return {"modules": summary.modules, "ranks": list(summary.ranks), "energy": summary.energy,
            "relative_error": summary.error}


def extract_lora(
    finetuned: str,
    base: str,
    output: str | Path,
    options: ExtractOptions,
    *,
    resolve_model: Callable[[str], Path] = Path,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    command: str | None = None,
) -> ExtractionResult:
    """Writes to ``output`` a PEFT LoRA adapter of ``base`` approximating ``finetuned - base``.

    Everything that can be refused is refused before any tensor is read. ``command`` (the
    command line) goes into the model card, README.md, as the way to make the adapter again.
    """
    check_target(output, overwrite=overwrite)
    device = resolve_device(options.device)
    paths = {finetuned: Path(resolve_model(finetuned)), base: Path(resolve_model(base))}
    refuse_output_among_inputs(output, paths)
    with open_checkpoint(paths[base]) as base_ckpt, open_checkpoint(paths[finetuned]) as ft_ckpt:
        plan = plan_extraction(base_ckpt, ft_ckpt, options)
        sink = progress or NullProgress()
        reads = [*plan.lora, *(n for names in plan.saved.values() for n in names), *plan.others]
        sink.start(len(reads), 2 * sum(ft_ckpt.entry(n).nbytes for n in reads))
        factors, reports, unchanged = _decompose_all(plan, base_ckpt, ft_ckpt, options, device, sink)
        saved, left_out, same = _changed(plan, base_ckpt, ft_ckpt, sink)
        contents = AdapterContents(
            factors=factors, embeddings=frozenset(r.module for r in reports if r.kind == "embedding"),
            saved={m: plan.saved[m] for m in saved}, source=ft_ckpt, all_modules=tuple(_by_module(ft_ckpt)),
            base_ref=base, causal_lm=is_causal_lm(paths[base]), dtype=options.dtype,
            fan_in_fan_out=any(m + ".weight" in plan.conv1d for m in factors))
        config = adapter_config(contents)
        result = ExtractionResult(Path(output), tuple(reports), tuple(saved), tuple(left_out), unchanged + same,
                                  json.loads(config.to_json()))
        card = extraction_card(result, finetuned, base, options, command)
        write_adapter(output, contents, config, files={CARD_FILE: card}, overwrite=overwrite)
    return result


def _decompose_all(plan: ExtractionPlan, base: Checkpoint, finetuned: Checkpoint, options: ExtractOptions,
                   device: torch.device, sink: ProgressSink,
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[ModuleReport], int]:
    """Each planned weight's factors (on the CPU, in their final dtype) and report; unchanged ones skipped."""
    factors, reports, unchanged = {}, [], 0
    for name, kind in plan.lora.items():
        delta = finetuned.read(name, device=device).float() - base.read(name, device=device).float()
        if not bool(delta.any()):
            unchanged += 1
        else:
            dtype = options.dtype or base.entry(name).dtype
            transposed = kind == "embedding" or name in plan.conv1d
            (b, a), report = _decompose(name.removesuffix(".weight"), kind, delta, transposed, dtype, options)
            factors[report.module] = (b.cpu(), a.cpu())
            reports.append(report)
        del delta
        sink.advance(name, 2 * finetuned.entry(name).nbytes)
    return factors, reports, unchanged


def _decompose(module: str, kind: Kind, delta: torch.Tensor, transposed: bool, dtype: torch.dtype,
               options: ExtractOptions) -> tuple[tuple[torch.Tensor, torch.Tensor], ModuleReport]:
    # PEFT factors the (out, in) delta of a Linear, the transpose of an embedding's or a Conv1D's.
    matrix = delta.T if transposed else delta
    sketch = options.rank + options.oversample if options.fast and options.rank is not None else None
    cut = low_rank(matrix, rank=options.rank, energy=options.energy, sketch=sketch, niter=options.niter,
                   seed=zlib.crc32(module.encode()))
    b, a = cut.b.to(dtype), cut.a.to(dtype)
    # Measured on the factors as stored: the dtype's rounding counts too.
    missed = float(torch.linalg.matrix_norm(matrix - b.float() @ a.float()).double() ** 2)
    report = ModuleReport(module, kind, a.shape[0], cut.kept / cut.total, math.sqrt(missed / cut.total),
                          math.sqrt(cut.total))
    return (b, a), report


def _changed(plan: ExtractionPlan, base: Checkpoint, finetuned: Checkpoint,
             sink: ProgressSink) -> tuple[list[str], list[str], int]:
    """The saved modules with a changed tensor, the other tensors that changed, and the unchanged count."""
    saved, left_out, same = [], [], 0
    for module, names in plan.saved.items():
        differ = list(_differing(names, base, finetuned, sink))
        saved += [module] if differ else []
        same += len(names) - len(differ)
    for name in _differing(plan.others, base, finetuned, sink):
        left_out.append(name)
    same += len(plan.others) - len(left_out)
    return saved, left_out, same


def _differing(names: Sequence[str], base: Checkpoint, finetuned: Checkpoint, sink: ProgressSink) -> Iterator[str]:
    for name in names:
        if not torch.equal(base.read(name), finetuned.read(name)):
            yield name
        sink.advance(name, 2 * finetuned.entry(name).nbytes)


LORA_PAPER = "https://arxiv.org/abs/2106.09685"


def extraction_card(result: ExtractionResult, finetuned: str, base: str, options: ExtractOptions,
                    command: str | None = None) -> str:
    """The adapter's model card: its inputs, the settings, and how much of the change it holds."""
    settings = {
        "finetuned": finetuned, "base": base, "rank": options.rank, "energy": options.energy,
        "targets": list(options.targets) or "every Linear weight", "embeddings": options.embeddings,
        "norms": options.norms, "dtype": dtype_name(options.dtype) if options.dtype else "the base's",
        "svd": (f"randomized (q = rank + {options.oversample}, niter = {options.niter})" if options.fast
                else "exact"),
    }
    return render_card(CardContent(
        title=f"LoRA adapter extracted from {finetuned}", method="extract-lora", paper=LORA_PAPER,
        description="a PEFT LoRA adapter of the base approximating the fine-tune's change, each weight's "
                    "change cut to low rank by its truncated SVD (B = U S, A = V^T, scaling 1).",
        inputs=[(base, "base"), (finetuned, "fine-tune")], recipe=settings, has_config=False, command=command,
        note=fidelity_table(result), relation="adapter",
    ))


def fidelity_table(result: ExtractionResult) -> str:
    """Markdown: per module type, the energy captured and the relative Frobenius error."""
    lines = ["## Fidelity", "",
             "Energy: the kept singular values' share of ||delta||^2. Error: ||delta - B A|| / ||delta|| "
             "with the factors as stored. Both weighted by each module's ||delta||^2.", "",
             "| module type | modules | rank | energy | relative error |", "|---|---:|---:|---:|---:|"]
    rows = [*result.by_type().items()]
    overall = result.overall()
    rows += [("all", overall)] if overall else []
    for kind, s in rows:
        ranks = str(s.ranks[0]) if s.ranks[0] == s.ranks[1] else f"{s.ranks[0]}-{s.ranks[1]}"
        lines.append(f"| {printable(kind)} | {s.modules} | {ranks} | {s.energy:.6f} | {s.error:.3e} |")
    if result.saved:
        names = ", ".join(f"`{printable(m)}`" for m in result.config.get("modules_to_save") or ())
        lines += ["", f"Saved whole: {len(result.saved)} modules (modules_to_save: {names})."]
    if result.left_out:
        lines += ["", f"Changed but not in the adapter: {len(result.left_out)} tensors (first: "
                      f"`{printable(result.left_out[0])}`)"]
    return "\n".join(lines)
