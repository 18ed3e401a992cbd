"""``mergekit-like extract-lora``: a PEFT LoRA adapter approximating a fine-tune's change from its base."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import cast

import typer
from mergekit_like.cli.output import RichProgress, console, handle_errors, one_output, print_json
from mergekit_like.cli.push_cmd import token_option, warn_if_token_on_command_line
from rich.table import Table

from mergekit_like.adapters.extract import EmbeddingMode, ExtractionResult, ExtractOptions, NormMode, extract_lora
from mergekit_like.errors import printable
from mergekit_like.hub import model_resolver
from mergekit_like.io.dtypes import parse_dtype

EXAMPLE = "Example: mergekit-like extract-lora ./finetuned --base ./base --rank 16 -o ./adapter"


def register(app: typer.Typer) -> None:
    app.command(
        "extract-lora",
        help="Write a PEFT LoRA adapter of BASE approximating FINETUNED - BASE: each weight's change cut to "
        "low rank by its truncated SVD, one tensor of each model read at a time. The adapter loads with "
        f"peft.PeftModel.from_pretrained(base, OUT), and as BASE+OUT wherever this tool reads a model.\n\n{EXAMPLE}",
    )(extract)


@handle_errors
def extract(
    finetuned: str = typer.Argument(..., help="The fine-tuned model (directory or Hub id)."),
    output_arg: Path = typer.Argument(None, metavar="[OUTPUT]", help="Output directory (or give -o)."),
    base: str = typer.Option(..., "--base", "-b", help="The model it was fine-tuned from."),
    output: Path = typer.Option(None, "--output", "-o", help="Output directory."),
    rank: int = typer.Option(None, "--rank", "-r", help="Rank of each module (the largest, with --energy)."),
    energy: float = typer.Option(None, "--energy", help="Per module, the smallest rank whose squared singular "
                                 "values reach this share of the total, e.g. 0.9 (capped by --rank)."),
    target: list[str] = typer.Option([], "--target", "-t", help="Modules to adapt (repeatable): a substring "
                                     "of the name, or a pattern with * ? [ ]; default every Linear weight."),
    embeddings: str = typer.Option("save", "--embeddings", help="Embeddings and the head: lora (low rank), "
                                   "save (whole, in modules_to_save) or skip."),
    norms: str = typer.Option("save", "--norms", help="Norms that changed: save (whole, in modules_to_save) "
                              "or skip."),
    dtype: str = typer.Option(None, "--dtype", help="Dtype of the factors and saved tensors (default: the "
                              "base's)."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run: cpu, cuda, cuda:N or auto."),
    fast: bool = typer.Option(False, "--fast", help="Randomized SVD (torch.svd_lowrank) for matrices at least "
                              "twice rank + oversample wide; needs --rank."),
    oversample: int = typer.Option(10, "--oversample", help="With --fast: extra columns of the random sketch."),
    niter: int = typer.Option(2, "--niter", help="With --fast: power iterations of the sketch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT once the new one is complete."),
    token: str = token_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
) -> None:
    warn_if_token_on_command_line(token)
    out = one_output(output_arg, output)
    options = ExtractOptions(
        # The strings as given: ExtractOptions names a wrong one in its error.
        rank=rank, energy=energy, targets=tuple(target), embeddings=cast(EmbeddingMode, embeddings),
        norms=cast(NormMode, norms), dtype=parse_dtype(dtype) if dtype else None, device=device,
        fast=fast, oversample=oversample, niter=niter,
    )
    resolver = model_resolver(token=token, quiet=quiet or as_json)
    command = "mergekit-like " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    with RichProgress("extract-lora", enabled=not (quiet or as_json)) as progress:
        result = extract_lora(finetuned, base, out, options, resolve_model=resolver, overwrite=overwrite,
                              progress=progress, command=command)
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        _print_summary(result)


def _print_summary(result: ExtractionResult) -> None:
    table = Table(header_style="bold")
    for column in ("module type", "modules", "rank", "energy", "relative error"):
        table.add_column(column, justify="left" if column == "module type" else "right")
    rows = [*result.by_type().items()]
    overall = result.overall()
    rows += [("all", overall)] if overall else []
    for kind, summary in rows:
        low, high = summary.ranks
        table.add_row(printable(kind), str(summary.modules), str(low) if low == high else f"{low}-{high}",
                      f"{summary.energy:.6f}", f"{summary.error:.3e}")
    console.print(table)
    if result.saved:
        names = ", ".join(printable(m) for m in result.config.get("modules_to_save") or ())
        console.print(f"saved whole (modules_to_save): {len(result.saved)} modules ({names})", highlight=False)
    if result.left_out:
        console.print(f"changed but not in the adapter: {len(result.left_out)} tensors (first: "
                      f"{printable(result.left_out[0])})", highlight=False)
    console.print(f"wrote {len(result.modules)} LoRA modules to {result.output}", highlight=False)
