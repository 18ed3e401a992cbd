"""Make the mergekit golden outputs in this folder (a tool for making test data, not a test).

mergekit is never a dependency of the project and no test imports it: this script runs the
real mergekit command line, installed in a separate virtual environment, and stores what
it writes. Run it with that environment's Python, from anywhere:

    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_goldens.py            # every case
    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_goldens.py CASE ...   # some cases
    /tmp/mkref/venv/bin/python tests/data/mergekit_golden/make_goldens.py --check    # rerun, compare, write nothing

The goldens in this folder were made with mergekit 0.1.5 (pip install mergekit==0.1.5),
torch 2.13.0+cpu, transformers 5.24.0, safetensors 0.8.0, Python 3.11.7, on CPU.

What it does:

* makes /tmp/mkref/golden/models a symlink to this folder's models/ (the recipes name the
  models by those absolute paths; the tests rewrite the prefix to this folder);
* for each case folder cases/<case>/ (all of them, or those named on the command line) runs
  mergekit on cases/<case>/recipe.yml with
  `--no-copy-tokenizer --random-seed 42 --device cpu` into a temporary folder:
  `mergekit-yaml recipe.yml OUT ...` for a one-document recipe, and for a recipe of several
  YAML documents (mergekit-multi form: documents with `name:`, later ones naming earlier
  ones as models, one unnamed final document)
  `mergekit-multi recipe.yml --intermediate-dir TMP --out-path OUT ...`;
* stores the (final) output's tensors as cases/<case>/expected.safetensors: mergekit's own
  model.safetensors byte for byte when it wrote one file (it does for these tiny models),
  otherwise all shards' tensors in one file;
* for a case whose output config differs in shape from its inputs' (a recipe with
  `slices:`), also stores the output config.json as cases/<case>/expected_config.json.

A case whose mergekit run fails is reported with mergekit's error and nothing of it is
written; the script exits non-zero if any case failed (or, with --check, differed).

The della and della_linear cases draw their masks from torch's global RNG (seeded by
--random-seed 42); their stored outputs are one draw and can only be compared
statistically, not bit for bit.

`--models DIR` writes a fresh set of tiny Llama models (f32 and bf16, base/ft1/ft2/ft3) made
from a fixed seed into DIR, which must not exist yet. It never writes into models/: the
committed models are the ones every golden depends on, and this generator is not the one
that made them (their values are not reproduced by it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
CASES = HERE / "cases"
ORIGINAL_ROOT = Path("/tmp/mkref/golden")
ORIGINAL_MODELS = ORIGINAL_ROOT / "models"
FLAGS = ["--no-copy-tokenizer", "--random-seed", "42", "--device", "cpu"]
BIN = Path(sys.executable).parent


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("mergekit", "torch", "transformers", "safetensors"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "?"
    out["python"] = sys.version.split()[0]
    return out


def link_models() -> None:
    """Make /tmp/mkref/golden/models point at this folder's models/."""
    ORIGINAL_ROOT.mkdir(parents=True, exist_ok=True)
    if ORIGINAL_MODELS.is_symlink():
        if ORIGINAL_MODELS.resolve() == MODELS.resolve():
            return
        ORIGINAL_MODELS.unlink()
    elif ORIGINAL_MODELS.exists():
        sys.exit(f"{ORIGINAL_MODELS} exists and is not a symlink; move it away first")
    ORIGINAL_MODELS.symlink_to(MODELS)


def documents(recipe: Path) -> list:
    return [d for d in yaml.safe_load_all(recipe.read_text()) if d is not None]


def run_mergekit(recipe: Path, out: Path, scratch: Path) -> subprocess.CompletedProcess:
    docs = documents(recipe)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if len(docs) > 1:
        cmd = [str(BIN / "mergekit-multi"), str(recipe), "--intermediate-dir", str(scratch / "intermediate"),
               "--out-path", str(out), *FLAGS]
    else:
        cmd = [str(BIN / "mergekit-yaml"), str(recipe), str(out), *FLAGS]
    print("  $", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=scratch)


def output_tensors_file(out: Path, dest: Path) -> None:
    """Write all of out's tensors into dest (mergekit's file itself when it wrote one)."""
    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"mergekit wrote no .safetensors file in {out}: {sorted(os.listdir(out))}")
    if len(files) == 1:
        shutil.copyfile(files[0], dest)
        return
    from safetensors.torch import load_file, save_file

    tensors: dict = {}
    for f in files:
        tensors.update(load_file(f))
    save_file(tensors, dest, metadata={"format": "pt"})


def config_changes(recipe_docs: list, out: Path) -> bool:
    """True for a recipe whose output config is not the inputs' (slices change the layer count)."""
    final = [d for d in recipe_docs if "name" not in d] or recipe_docs[-1:]
    if "slices" in final[-1]:
        return True
    base_cfg = json.loads((MODELS / "f32" / "base" / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    return out_cfg.get("num_hidden_layers") != base_cfg["num_hidden_layers"]


def tensors_equal(a: Path, b: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if set(ta) != set(tb):
        return False, f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}"
    bad = [n for n in ta if ta[n].dtype != tb[n].dtype or ta[n].shape != tb[n].shape
           or not torch.equal(ta[n].contiguous().view(torch.uint8), tb[n].contiguous().view(torch.uint8))]
    if bad:
        return False, f"{len(bad)} of {len(ta)} tensors differ, e.g. {bad[:3]}"
    return True, f"all {len(ta)} tensors identical byte for byte" + (
        ", whole file identical" if a.read_bytes() == b.read_bytes() else ", file bytes differ")


def make_case(case: str, check: bool) -> bool:
    folder = CASES / case
    recipe = folder / "recipe.yml"
    if not recipe.is_file():
        print(f"{case}: no recipe.yml in {folder}")
        return False
    print(f"{case}:", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"golden-{case}-") as tmp:
        scratch = Path(tmp)
        out = scratch / "out"
        proc = run_mergekit(recipe, out, scratch)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            print(f"  mergekit FAILED (exit {proc.returncode}):")
            for line in err[-15:]:
                print("    " + line)
            return False
        docs = documents(recipe)
        stores_config = config_changes(docs, out)
        if check:
            ok, msg = tensors_equal(out / "model.safetensors" if (out / "model.safetensors").exists()
                                    else next(out.glob("*.safetensors")), folder / "expected.safetensors")
            if stores_config:
                stored = folder / "expected_config.json"
                same_cfg = stored.exists() and (out / "config.json").read_bytes() == stored.read_bytes()
                msg += "; config.json " + ("identical" if same_cfg else "DIFFERS")
                ok = ok and same_cfg
            print(("  same: " if ok else "  DIFFERENT: ") + msg)
            return ok
        output_tensors_file(out, folder / "expected.safetensors")
        if stores_config:
            shutil.copyfile(out / "config.json", folder / "expected_config.json")
        else:
            (folder / "expected_config.json").unlink(missing_ok=True)
        size = (folder / "expected.safetensors").stat().st_size
        print(f"  wrote expected.safetensors ({size} bytes)" + (" and expected_config.json" if stores_config else ""))
        return True


def make_models(dest: Path) -> None:
    """A fresh tiny model set from seed 0 (not the committed models; see the docstring)."""
    import torch
    from safetensors.torch import save_file

    if dest.exists():
        sys.exit(f"{dest} exists; --models writes only into a new folder")
    if dest.resolve().is_relative_to(MODELS.resolve()):
        sys.exit("--models never writes into the committed models/ folder")
    hidden, inter, vocab, layers = 16, 24, 32, 3
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    shapes = {"lm_head.weight": (vocab, hidden), "model.embed_tokens.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.down_proj.weight": (hidden, inter), p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden), p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
        })
    gen = torch.Generator().manual_seed(0)
    base = {n: (1 + 0.05 * torch.randn(s, generator=gen)) if n.endswith("norm.weight")
            else 0.5 * torch.randn(s, generator=gen) for n, s in sorted(shapes.items())}
    sets = {"base": base}
    for name, scale in (("ft1", 0.05), ("ft2", 0.1), ("ft3", 0.03)):
        sets[name] = {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    for kind, dtype, label in (("f32", torch.float32, "float32"), ("bf16", torch.bfloat16, "bfloat16")):
        for name, tensors in sets.items():
            d = dest / kind / name
            d.mkdir(parents=True)
            save_file({n: t.to(dtype).contiguous() for n, t in tensors.items()}, d / "model.safetensors",
                      metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(dict(config, torch_dtype=label), indent=2) + "\n")
    print(f"wrote a fresh model set under {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help="case folders under cases/ (default: all)")
    ap.add_argument("--check", action="store_true", help="rerun and compare with the stored outputs; write nothing")
    ap.add_argument("--models", type=Path, metavar="DIR", help="write a fresh tiny model set into DIR (a new folder)")
    args = ap.parse_args()
    if args.models:
        make_models(args.models)
        return
    v = versions()
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    if v["mergekit"] != "0.1.5":
        print("warning: the committed goldens were made with mergekit 0.1.5")
    link_models()
    names = args.cases or sorted(p.name for p in CASES.iterdir() if (p / "recipe.yml").is_file())
    failed = [c for c in names if not make_case(c, args.check)]
    print(f"{len(names) - len(failed)} of {len(names)} cases " + ("match" if args.check else "made"))
    if failed:
        print("failed: " + " ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
