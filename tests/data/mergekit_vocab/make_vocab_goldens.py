"""Make the vocabulary-merge goldens in this folder (a tool for making test data, not a test).

mergekit is never a dependency of the project and no test imports it: this script builds a
few tiny Llama models whose vocabularies differ, runs the real mergekit command line on a
set of recipes and stores everything mergekit writes. Run it with the Python of a venv where
mergekit 0.1.5 is installed, from anywhere:

    VENV_PYTHON tests/data/mergekit_vocab/make_vocab_goldens.py --models   # rebuild models/, run every case
    VENV_PYTHON tests/data/mergekit_vocab/make_vocab_goldens.py            # run every case
    VENV_PYTHON tests/data/mergekit_vocab/make_vocab_goldens.py CASE ...   # run some cases
    VENV_PYTHON tests/data/mergekit_vocab/make_vocab_goldens.py --check    # rebuild and rerun in a temp
                                                                           # dir, compare, write nothing

The data here was made with mergekit 0.1.5, torch 2.13.0+cpu, transformers 5.24.0,
tokenizers 0.23.3, safetensors 0.8.0, Python 3.11.7, on CPU.

What it does:

* `--models` (re)writes models/ from fixed seeds using torch, safetensors and tokenizers only
  (transformers is used afterwards, only to check that every model's tokenizer and config
  load): one BPE tokenizer trained on the small corpus below, and the models in MODELS_DOC;
* writes each case's recipe (CASES below) as cases/<case>/recipe.yml and runs
  `mergekit-yaml cases/<case>/recipe.yml OUT --random-seed 42 --device cpu` with this folder
  as working directory and HF_HUB_OFFLINE=1 (recipes name models by relative paths such as
  ./models/base: the leading ./ keeps mergekit's model card from taking them for Hugging
  Face repo ids), then stores mergekit's whole output folder as cases/<case>/expected/
  (README.md and mergekit_config.yml are dropped only if they contain an absolute path);
* mergekit orders the models of a recipe by a Python set, differently in every process;
  the script reruns mergekit until a run has the recipe's order (see run_mergekit), so
  "no base_model" means "the first model listed is the donor", as the recipe reads;
* a case whose mergekit run fails is reported with mergekit's error and nothing of it is
  written; the script keeps going and exits non-zero at the end.

Still random per run: the ids that `tokenizer: {source: union}` gives to regular (non-added)
tokens that only a non-base model has, which follow a Rust HashMap's order (only the
union_retrained_linear case has such tokens). `--check` reports which ids moved and whether
each token string's rows stayed the same.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MERGEKIT_FLAGS = ["--random-seed", "42", "--device", "cpu"]
ATTEMPTS, BATCH = 48, 6  # mergekit runs per case at most, and at once (see run_mergekit)

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 16, 24, 2, 2, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<s>", "</s>", "<unk>"]
BPE_VOCAB = 64

CORPUS = """\
the quick brown fox jumps over the lazy dog.
a model is a set of weights and a tokenizer.
we merge the weights of two models into one model.
the tokenizer maps text to token ids and back to text.
each token has one row in the embedding and one row in the head.
when two models share a vocabulary the rows line up.
when the vocabularies differ the rows must be matched by token.
"""

RETRAINED_CORPUS = """\
kittens play in the warm sun while puppies sleep.
music and rhythm fill the quiet evening air.
sixty jazz players meet by the river every july.
zebras, yaks and owls visit the village market.
"""

ADDED_TOKENS = [  # (content, special), appended in this order at ids V..V+9
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("merging", False),
    ("checkpoint", False),
    ("<tool_call>", True),
    ("</tool_call>", True),
    ("vocabulary", False),
    ("embedding", False),
    ("tensor", False),
    ("golden", False),
]

MODELS_DOC = {
    "base": "the BPE tokenizer as trained; random weights; untied (lm_head stored)",
    "shuffled": "base's token strings under a fixed permutation of every id (specials too); "
    "embedding/lm_head row of each token = base's row of that token + noise 0.02; other "
    "tensors base + noise",
    "added": "base's tokenizer + 10 added tokens (4 special) at ids V..V+9; first V rows base + noise, new rows random",
    "tied": "base's tokenizer; tie_word_embeddings true, no lm_head.weight stored; base + noise",
    "tied_both": "like tied, but lm_head.weight stored too, equal to model.embed_tokens.weight",
    "retrained": "a second BPE tokenizer trained on another corpus (same specials first), so "
    "it has regular (non-added) tokens base lacks; random weights; untied",
}

CASES = {
    "union_linear": """\
merge_method: linear
models:
  - model: ./models/base
    parameters: {weight: 0.5}
  - model: ./models/shuffled
    parameters: {weight: 0.3}
  - model: ./models/added
    parameters: {weight: 0.2}
tokenizer:
  source: union
dtype: float32
""",
    "union_task_arithmetic": """\
merge_method: task_arithmetic
base_model: ./models/base
models:
  - model: ./models/shuffled
    parameters: {weight: 0.7}
  - model: ./models/added
    parameters: {weight: 0.5}
tokenizer:
  source: union
dtype: float32
""",
    "union_ties": """\
merge_method: ties
base_model: ./models/base
models:
  - model: ./models/shuffled
    parameters: {density: 0.6, weight: 1.0}
  - model: ./models/added
    parameters: {density: 0.6, weight: 0.5}
tokenizer:
  source: union
dtype: float32
""",
    "model_source_forced": """\
merge_method: task_arithmetic
base_model: ./models/base
models:
  - model: ./models/shuffled
    parameters: {weight: 0.7}
  - model: ./models/added
    parameters: {weight: 0.5}
tokenizer:
  source: ./models/added
  tokens:
    "<|im_start|>":
      source: ./models/added
      force: true
    "<tool_call>":
      source: {kind: zero}
    "merging":
      source: {kind: model_token, model: ./models/base, token: "<s>"}
dtype: float32
""",
    "base_source_legacy": """\
merge_method: task_arithmetic
base_model: ./models/base
models:
  - model: ./models/shuffled
    parameters: {weight: 0.7}
  - model: ./models/added
    parameters: {weight: 0.5}
tokenizer_source: base
dtype: float32
""",
    "union_pad": """\
merge_method: linear
models:
  - model: ./models/base
    parameters: {weight: 0.6}
  - model: ./models/added
    parameters: {weight: 0.4}
tokenizer:
  source: union
  pad_to_multiple_of: 32
dtype: float32
""",
    "union_chatml": """\
merge_method: linear
models:
  - model: ./models/base
    parameters: {weight: 0.6}
  - model: ./models/added
    parameters: {weight: 0.4}
tokenizer:
  source: union
chat_template: chatml
dtype: float32
""",
    "tied_mix_linear": """\
merge_method: linear
models:
  - model: ./models/base
    parameters: {weight: 0.6}
  - model: ./models/tied
    parameters: {weight: 0.4}
dtype: float32
""",
    "tied_first_mix_linear": """\
merge_method: linear
models:
  - model: ./models/tied
    parameters: {weight: 0.6}
  - model: ./models/base
    parameters: {weight: 0.4}
dtype: float32
""",
    "tied_both_linear": """\
merge_method: linear
models:
  - model: ./models/tied
    parameters: {weight: 0.6}
  - model: ./models/tied_both
    parameters: {weight: 0.4}
dtype: float32
""",
    "tied_union_ties": """\
merge_method: ties
base_model: ./models/tied
models:
  - model: ./models/shuffled
    parameters: {density: 0.6, weight: 1.0}
  - model: ./models/added
    parameters: {density: 0.6, weight: 0.5}
tokenizer:
  source: union
dtype: float32
""",
    "union_retrained_linear": """\
merge_method: linear
models:
  - model: ./models/base
    parameters: {weight: 0.5}
  - model: ./models/retrained
    parameters: {weight: 0.3}
  - model: ./models/added
    parameters: {weight: 0.2}
tokenizer:
  source: union
dtype: float32
""",
}


# ---------------------------------------------------------------- tokenizers


def train_tokenizer(corpus: str):
    """One byte-level BPE tokenizer (specials at ids 0, 1, 2), trained deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def tokenizer_dict(tok) -> dict:
    return json.loads(tok.to_str())


def permute_tokenizer(tok_json: dict, perm: list[int]) -> dict:
    """Give token of old id i the id perm[i]; merges (strings) stay as they are."""
    out = json.loads(json.dumps(tok_json))
    out["model"]["vocab"] = {
        t: perm[i] for t, i in sorted(tok_json["model"]["vocab"].items(), key=lambda kv: perm[kv[1]])
    }
    for entry in out["added_tokens"]:
        entry["id"] = perm[entry["id"]]
    out["added_tokens"].sort(key=lambda e: e["id"])
    return out


def add_tokens(tok_json: dict) -> dict:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(json.dumps(tok_json))
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=not special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tokenizer_dict(tok)


def tokenizer_config(tok_json: dict) -> dict:
    decoder = {
        str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for e in tok_json["added_tokens"]
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def vocab_of(tok_json: dict) -> dict[str, int]:
    vocab = dict(tok_json["model"]["vocab"])
    vocab.update({e["content"]: e["id"] for e in tok_json["added_tokens"]})
    return vocab


# ---------------------------------------------------------------- weights


def random_weights(vocab: int, gen: torch.Generator, scale: float = 0.1) -> dict:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * scale

    w = {"model.embed_tokens.weight": rnd(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rnd(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * HEAD_DIM)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN)
        w[p + "mlp.gate_proj.weight"] = rnd(INTERMEDIATE, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rnd(INTERMEDIATE, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTERMEDIATE)
    w["model.norm.weight"] = 1 + rnd(HIDDEN)
    w["lm_head.weight"] = rnd(vocab, HIDDEN)
    return w


def with_noise(weights: dict, gen: torch.Generator, scale: float = 0.02) -> dict:
    return {k: v + torch.randn(v.shape, generator=gen) * scale for k, v in weights.items()}


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def model_config(vocab: int, bos: int, eos: int, tied: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": bos,
        "dtype": "float32",
        "eos_token_id": eos,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 128,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "vocab_size": vocab,
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model(out: Path, weights: dict, tok_json: dict, tied: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab_of(tok_json)
    rows = weights["model.embed_tokens.weight"].shape[0]
    assert rows == len(vocab), (out, rows, len(vocab))
    bos, eos = vocab["<s>"], vocab["</s>"]
    tensors = {k: v.contiguous().clone() for k, v in sorted(weights.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", model_config(rows, bos, eos, tied))
    write_json(
        out / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos},
    )
    write_json(out / "tokenizer.json", tok_json)
    write_json(out / "tokenizer_config.json", tokenizer_config(tok_json))


def build_models(root: Path) -> None:
    """Write every model under root/ (deterministic: fixed seeds, fixed corpus)."""
    if root.exists():
        shutil.rmtree(root)
    base_tok = tokenizer_dict(train_tokenizer(CORPUS))
    v = len(vocab_of(base_tok))
    base = random_weights(v, torch.Generator().manual_seed(0))
    write_model(root / "base", base, base_tok, tied=False)

    # shuffled: token of base id i gets id perm[i]; its rows move with it.
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(1)).tolist()
    inv = [0] * v
    for old, new in enumerate(perm):
        inv[new] = old
    shuffled = with_noise(base, torch.Generator().manual_seed(2))
    for name in VOCAB_TENSORS:
        shuffled[name] = shuffled[name][inv]
    write_model(root / "shuffled", shuffled, permute_tokenizer(base_tok, perm), tied=False)

    # added: 10 added tokens appended; their rows random.
    gen = torch.Generator().manual_seed(3)
    added = with_noise(base, gen)
    for name in VOCAB_TENSORS:
        added[name] = torch.cat([added[name], torch.randn(len(ADDED_TOKENS), HIDDEN, generator=gen) * 0.1])
    write_model(root / "added", added, add_tokens(base_tok), tied=False)

    tied = with_noise(base, torch.Generator().manual_seed(4))
    del tied["lm_head.weight"]
    write_model(root / "tied", tied, base_tok, tied=True)

    tied_both = with_noise(base, torch.Generator().manual_seed(5))
    tied_both["lm_head.weight"] = tied_both["model.embed_tokens.weight"].clone()
    write_model(root / "tied_both", tied_both, base_tok, tied=True)

    re_tok = tokenizer_dict(train_tokenizer(RETRAINED_CORPUS))
    retrained = random_weights(len(vocab_of(re_tok)), torch.Generator().manual_seed(6))
    write_model(root / "retrained", retrained, re_tok, tied=False)
    check_models(root, base_tok)


def check_models(root: Path, base_tok: dict) -> None:
    """Check with transformers that every tokenizer and config loads as written."""
    import transformers

    base_vocab = vocab_of(base_tok)
    clash = [t for t, _ in ADDED_TOKENS if t in base_vocab]
    assert not clash, f"added tokens already in the base vocabulary: {clash}"
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        cfg = transformers.AutoConfig.from_pretrained(str(d))
        on_disk = vocab_of(json.loads((d / "tokenizer.json").read_text(encoding="utf-8")))
        assert tok.get_vocab() == on_disk, d
        assert len(on_disk) == cfg.vocab_size, d
        assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id), d
        assert tok.unk_token == "<unk>", d
        rows = load_file(str(d / "model.safetensors"))["model.embed_tokens.weight"].shape[0]
        assert rows == cfg.vocab_size, d
        print(
            f"model {d.name}: vocab {cfg.vocab_size}, bos {cfg.bos_token_id}, "
            f"eos {cfg.eos_token_id}, tied {cfg.tie_word_embeddings}"
        )


# ---------------------------------------------------------------- cases


def write_recipe(root: Path, case: str) -> Path:
    path = root / "cases" / case / "recipe.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CASES[case], encoding="utf-8")
    return path


def recipe_order(case: str) -> list[str]:
    """The recipe's models in the order written, base_model left out (as the card lists them)."""
    recipe = yaml.safe_load(CASES[case])
    return [m["model"] for m in recipe["models"] if m["model"] != recipe.get("base_model")]


def card_order(out: Path) -> list[str]:
    """The models listed in mergekit's README.md, i.e. its referenced_models() order."""
    lines = (out / "README.md").read_text(encoding="utf-8").splitlines()
    return [line[2:] for line in lines if line.startswith("* ")]


def mergekit_once(root: Path, case: str, out: Path) -> str | None:
    """Run mergekit for one case into out; return None on success, else its error."""
    recipe = (root / "cases" / case / "recipe.yml").relative_to(root)
    cmd = [str(BIN / "mergekit-yaml"), str(recipe), str(out), *MERGEKIT_FLAGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return "\n".join(lines[-5:]) or f"exit {proc.returncode}"
    return None


def run_mergekit(root: Path, case: str, tmp: Path) -> tuple[Path | None, str | None]:
    """Run mergekit until its model order is the recipe's; return (output folder, error).

    mergekit keeps the referenced models in a Python set, whose order changes from process
    to process (on Python 3.11 hash(None) is an address, so PYTHONHASHSEED does not fix
    it). That order picks the output config and the union's base tokenizer when there is no
    base_model, and the card's model list. Runs go in parallel batches until one has the
    recipe's order (read back from README.md).
    """
    want = recipe_order(case)
    for first in range(0, ATTEMPTS, BATCH):
        outs = [tmp / f"try{i}" / "expected" for i in range(first, first + BATCH)]
        with ThreadPoolExecutor(BATCH) as pool:
            errors = list(pool.map(lambda o: mergekit_once(root, case, o), outs))
        for out, error in zip(outs, errors):
            if error:
                return None, error
            if card_order(out) == want:
                return out, None
    return None, f"no run in {ATTEMPTS} had the models in recipe order {want}"


def drop_absolute_paths(out: Path, absolute: list[str]) -> None:
    for name in ("README.md", "mergekit_config.yml"):
        p = out / name
        if p.exists() and any(a in p.read_text(encoding="utf-8") for a in absolute):
            print(f"  dropping {name}: it contains an absolute path")
            p.unlink()


def make_case(root: Path, case: str) -> bool:
    write_recipe(root, case)
    with tempfile.TemporaryDirectory() as tmp:
        out, error = run_mergekit(root, case, Path(tmp))
        if error:
            shutil.rmtree(root / "cases" / case)
            print(f"case {case}: mergekit FAILED:\n{error}")
            return False
        drop_absolute_paths(out, [str(root), tmp])
        dest = root / "cases" / case / "expected"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(out, dest)
    print(f"case {case}: ok ({', '.join(sorted(p.name for p in dest.iterdir()))})")
    return True


# ---------------------------------------------------------------- --check


def output_vocab(out: Path) -> dict[str, int]:
    return vocab_of(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")))


def compare_outputs(a: Path, b: Path) -> list[str]:
    """Differences between two mergekit outputs of one case (empty when identical)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    diffs = []
    for name in names:
        pa, pb = a / name, b / name
        if not (pa.exists() and pb.exists()):
            diffs.append(f"{name}: only in one run")
        elif not filecmp.cmp(pa, pb, shallow=False):
            diffs.append(f"{name}: differs")
    if any(d.startswith("tokenizer.json") for d in diffs) or any(d.startswith("model") for d in diffs):
        diffs += compare_by_token(a, b)
    return diffs


def compare_by_token(a: Path, b: Path) -> list[str]:
    """Which token ids moved, and whether each token string's rows stayed the same."""
    if not (a / "tokenizer.json").exists():
        return []
    va, vb = output_vocab(a), output_vocab(b)
    moved = sorted((i, t, vb.get(t)) for t, i in va.items() if vb.get(t) != i)
    notes = [f"  token {t!r}: id {i} -> {j}" for i, t, j in moved]
    ta = load_outputs(a)
    tb = load_outputs(b)
    for name in VOCAB_TENSORS:
        if name not in ta:
            continue
        same = all(t in vb and torch.equal(ta[name][i], tb[name][vb[t]]) for t, i in va.items())
        notes.append(f"  {name}: rows per token string {'identical' if same else 'DIFFER'}")
    return notes


def load_outputs(out: Path) -> dict:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def check(cases: list[str]) -> bool:
    """Rebuild models and rerun cases in a temp dir; compare with what is stored here."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root / "models")
        for d in sorted((HERE / "models").iterdir()):
            for f in sorted(d.iterdir()):
                if not filecmp.cmp(f, root / "models" / d.name / f.name, shallow=False):
                    print(f"models/{d.name}/{f.name}: differs from a fresh build")
                    ok = False
        for case in cases:
            write_recipe(root, case)
            out, error = run_mergekit(root, case, root / "runs" / case)
            if error:
                print(f"case {case}: mergekit FAILED:\n{error}")
                ok = False
                continue
            drop_absolute_paths(out, [str(root)])
            diffs = compare_outputs(HERE / "cases" / case / "expected", out)
            print(f"case {case}: {'identical' if not diffs else 'DIFFERS'}")
            for d in diffs:
                print(f"  {d}")
            ok = ok and not diffs
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", action="store_true", help="rebuild models/ first")
    ap.add_argument("--check", action="store_true", help="rerun in a temp dir and compare")
    ap.add_argument("cases", nargs="*", metavar="CASE", help="cases to run (default: all)")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases: {unknown}; known: {sorted(CASES)}")
    cases = args.cases or list(CASES)
    if args.check:
        return 0 if check(cases) else 1
    if args.models:
        build_models(HERE / "models")
    failed = [c for c in cases if not make_case(HERE, c)]
    if failed:
        print(f"FAILED cases: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
