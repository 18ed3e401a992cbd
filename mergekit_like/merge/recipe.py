"""Merge recipes: mergekit's YAML form, this tool's extensions, and the quick CLI form.

A recipe is parsed into a frozen :class:`MergeRecipe`, which validates itself
against the method's declaration whenever one is made: parsed from YAML, built
from the quick CLI form, or derived by an override (``with_*``,
``dataclasses.replace``). Every problem is reported at once
(:class:`~mergekit_like.errors.RecipeError`), before any checkpoint is opened.
Keys this tool does not support are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_like.errors import RecipeError, UnsupportedDtypeError, short_repr, short_text
from mergekit_like.io.dtypes import dtype_name, parse_dtype
from mergekit_like.io.experts import EXPERT_LAYOUTS
from mergekit_like.merge.parameters import (
    check_value_form,
    expanded_size_exceeds,
    is_gradient,
    numeric_values,
    too_large_for_float,
    unquoted,
)
from mergekit_like.merge.slices import (
    OutputModule,
    OutputSlice,
    modules_to_dict,
    parse_modules,
    parse_slices,
    slices_to_dict,
)
from mergekit_like.methods import BaseUse, MergeMethod, ParamSpec, all_methods, get_method
from mergekit_like.vocab.chat_templates import chat_template_problem
from mergekit_like.vocab.spec import TokenizerSpec, parse_source, parse_tokenizer

logger = logging.getLogger(__name__)

# This tool's own settings, kept in a section of their own when a recipe is written: mergekit
# ignores keys it does not know, and none of these changes what mergekit's keys mean. They are
# also read at the top level, where earlier versions wrote them.
EXTENSION_SECTION = "mergekit_like"
EXTENSION_KEYS = {"compute_dtype", "seed", "vocab_mismatch", "expert_layout"}
# mergekit keys we understand, and our own extensions.
RECIPE_KEYS = {
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", EXTENSION_SECTION, *EXTENSION_KEYS,
}
VOCAB_MISMATCH = ("error", "base")
MODEL_KEYS = {"model", "parameters"}
# Values a recipe (or one -p value) may hold, counting a value each time an alias repeats it.
# Real recipes hold at most thousands; a 500-byte alias bomb holds 9**9.
MAX_RECIPE_VALUES = 100_000
_ALIASES_REPEAT = "YAML anchors and aliases (&name, *name) repeat a value each time it is used"


class _DuplicateKey(yaml.YAMLError):
    """A mapping gives one key twice (YAML would silently keep the last)."""

    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"duplicate key {short_repr(key)} at line {line} (first at line {first}); give each key once")


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing duplicate keys and reading ``1e-3`` as a number."""

    def compose_mapping_node(self, anchor: Any) -> Any:
        # Checked as composed, not as constructed: merge keys (``<<: *a``) rewrite a node's
        # pairs during construction, and a key they bring in may be overridden once.
        node = super().compose_mapping_node(anchor)
        first_lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_lines:
                raise _DuplicateKey(key.value, line, first_lines[key.tag, key.value])
            first_lines[key.tag, key.value] = line
        return node


# YAML 1.1 reads a float only with a dot and a signed exponent ("1.0e-3"); mergekit's typed
# config reads "1e-3", "1E5" and "-2e+3" as floats too, so recipes written for it mean numbers.
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _YamlProblem(Exception):
    """Why a text is not YAML a recipe can use, as one line."""


def _load_yaml(text: str) -> Any:
    """``text`` read as YAML with :class:`_RecipeLoader`, or :class:`_YamlProblem`."""
    return _read_yaml(lambda: yaml.load(text, Loader=_RecipeLoader))


def _load_yaml_documents(text: str) -> list[Any]:
    """Every document of ``text`` (``---`` separated), or :class:`_YamlProblem`."""
    return list(_read_yaml(lambda: list(yaml.load_all(text, Loader=_RecipeLoader))))


def _read_yaml(load: Callable[[], Any]) -> Any:
    try:
        return load()
    except _DuplicateKey as exc:
        raise _YamlProblem(str(exc)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = exc.problem or exc.context or type(exc).__name__
        raise _YamlProblem(f"not valid YAML ({short_text(str(reason))}{where})") from None
    except yaml.YAMLError as exc:
        raise _YamlProblem(f"not valid YAML ({short_text(str(exc).splitlines()[0] if str(exc) else '')})") from None
    except RecursionError:  # the YAML parser recurses once per level of nesting
        raise _YamlProblem("nested too deeply to be a recipe") from None
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        # PyYAML's constructors raise these for bad tagged scalars ('!!int ~', '!!timestamp x')
        # and for integers past Python's digit limit.
        raise _YamlProblem(f"not valid YAML ({type(exc).__name__}: {short_text(str(exc))})") from None


@dataclass(frozen=True)
class ModelEntry:
    """One input model as the recipe lists it, with its own parameter values."""

    model: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceRecipe:
    """One slice of a layered recipe (or a module merged whole) and the recipe it merges by."""

    module: str | None  # None: the model's one module (a top-level ``slices:``)
    label: str  # where the recipe writes it, for messages: "slices[2]"
    slice: OutputSlice | None  # None: the module's models, each over all its layers
    recipe: MergeRecipe


@dataclass(frozen=True)
class MergeRecipe:
    """A validated merge recipe."""

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # mergekit's `dtype`: tensors are cast to it and merged in it. None: as mergekit does
    # without `dtype`, in the inputs' own (promoted) dtype. The quick CLI form says float32.
    compute_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    # mergekit's `dtype` also sets the output dtype when `out_dtype` is absent.
    dtype_sets_output: bool = False
    seed: int = 0
    # mergekit's ``tokenizer:`` section (or its older ``tokenizer_source:``): the output vocabulary,
    # embeddings and heads aligned by token. None: every model's rows as they are.
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # "auto", a built-in name, or a Jinja template
    # Mixture-of-experts tensors as merged and written: "fused" (transformers 5, mergekit), "stored"
    # (one tensor per expert, transformers 4), or "auto": fused unless transformers 4 is installed.
    expert_layout: str = "auto"
    # Embeddings/heads whose row counts differ: "error", or "base" (follow the reference model).
    vocab_mismatch: str = "error"
    # mergekit's layer-range forms (instead of ``models``): output slices, or modules with their own.
    slices: tuple[OutputSlice, ...] = ()
    modules: Mapping[str, OutputModule] = field(default_factory=dict)
    # Parameter scopes below this recipe's own, highest first: a slice's recipe falls through to
    # its module's and the whole recipe's parameters, as mergekit resolves a value.
    inherited_parameters: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        problems = recipe_problems(self)
        if problems:
            raise RecipeError(problems)

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)  # no sorted copy of the registry: read per tensor

    @property
    def layered(self) -> bool:
        """Whether the recipe is written as slices or modules rather than whole models."""
        return bool(self.slices or self.modules)

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, each once, in the order it names them."""
        refs = [m.model for m in self.models]
        refs += [s.model for piece in self.slices for s in piece.sources]
        for module in self.modules.values():
            refs += [s.model for piece in module.slices for s in piece.sources] + [m for m, _ in module.models]
        refs += [piece.base_model for piece in self.slices if piece.base_model]
        refs += [piece.base_model for m in self.modules.values() for piece in m.slices if piece.base_model]
        if self.base_model is not None:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    def slice_recipes(self) -> list[SliceRecipe]:
        """What each slice (or whole-model module) merges, as a recipe of its own, in output order.

        Raises :class:`RecipeError` naming the slice for every slice that is not a valid recipe.
        """
        views, problems = self._slice_views()
        if problems:
            raise RecipeError(problems)
        return views

    def _slice_views(self) -> tuple[list[SliceRecipe], list[str]]:
        modules: list[tuple[str | None, OutputModule]] = (
            [(None, OutputModule(slices=self.slices))] if self.slices else list(self.modules.items()))
        views, problems = [], []
        for name, module in modules:
            where = "slices" if name is None else f"modules.{name}.slices"
            pieces: tuple[OutputSlice | None, ...] = module.slices or (None,)
            for index, piece in enumerate(pieces):
                label = f"{where}[{index}]" if piece is not None else f"modules.{name}"
                try:
                    views.append(SliceRecipe(name, label, piece, self._slice_recipe(module, piece)))
                except RecipeError as invalid:
                    problems += [f"{label}: {p}" for p in invalid.problems]
        return views, problems

    def _slice_recipe(self, module: OutputModule, piece: OutputSlice | None) -> MergeRecipe:
        method_name = (piece.merge_method if piece is not None else None) or self.merge_method
        method = all_methods().get(method_name)
        scopes = [module.parameters, self.parameters] if piece is None else [piece.parameters, module.parameters,
                                                                              self.parameters]
        if method is not None:
            # Values from above reach a slice of another method only where they mean something; its
            # own are checked against its method like any recipe's (a misspelt one is an error).
            scopes = [scopes[0], *({k: v for k, v in scope.items() if k in method.params} for scope in scopes[1:])]
        if piece is None:
            models = tuple(ModelEntry(m, dict(p)) for m, p in module.models)
            base = self.base_model
        else:
            models = tuple(ModelEntry(s.model, dict(s.parameters)) for s in piece.sources)
            base = piece.base_model or self.base_model
            listed = any(m.model == base for m in models)
            if base is not None and not listed:
                if method is not None and method.base is not BaseUse.NONE:
                    raise RecipeError([f"base_model '{base}' is not among the slice's sources; list it with its "
                                       "layer_range"])
                base = None  # a method without a base input merges only what the slice lists
        return MergeRecipe(
            merge_method=method_name, models=models, base_model=base, parameters=dict(scopes[0]),
            inherited_parameters=tuple(scopes[1:]), compute_dtype=self.compute_dtype, out_dtype=self.out_dtype,
            dtype_sets_output=self.dtype_sets_output, seed=self.seed, tokenizer=self.tokenizer,
            chat_template=self.chat_template, vocab_mismatch=self.vocab_mismatch, expert_layout=self.expert_layout,
        )

    @property
    def inputs(self) -> list[ModelEntry]:
        """The models the kernel merges: every listed model, less the base for methods that use one."""
        if self.method.base is BaseUse.NONE:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    @property
    def sweep_values(self) -> list[Any] | None:
        """For a method with a sweep parameter, the list of values that each give one output."""
        name = self.method.sweep_param
        value = self.parameters.get(name) if name else None
        return list(value) if isinstance(value, list) and is_gradient(value) else None

    def with_defaults(self) -> MergeRecipe:
        """This recipe with every method parameter it leaves out set, globally, to its default.

        A value set per model or by a filter still wins (per-model > global), and a filter
        that matches nothing falls through to the global value as it fell to the default,
        so the merge is unchanged; the recipe just no longer depends on this tool's defaults.
        """
        filled = dict(self.parameters)
        for key, spec in self.method.params.items():
            # A default of None ("no value") is written as no key: mergekit reads no null values.
            if key not in filled and not spec.required and spec.default is not None:
                filled[key] = spec.default
        return dataclasses.replace(self, parameters=filled)

    def with_refs(self, refs: Mapping[str, str]) -> MergeRecipe:
        """This recipe with model references renamed (``refs``: old -> new; others kept)."""
        def rename(ref: str) -> str:
            return refs.get(ref, ref)

        def renamed(pieces: tuple[OutputSlice, ...]) -> tuple[OutputSlice, ...]:
            return tuple(dataclasses.replace(
                piece, sources=tuple(dataclasses.replace(s, model=rename(s.model)) for s in piece.sources),
                base_model=None if piece.base_model is None else rename(piece.base_model)) for piece in pieces)

        return dataclasses.replace(
            self,
            models=tuple(dataclasses.replace(m, model=rename(m.model)) for m in self.models),
            slices=renamed(self.slices),
            modules={name: dataclasses.replace(module, slices=renamed(module.slices),
                                               models=tuple((rename(m), p) for m, p in module.models))
                     for name, module in self.modules.items()},
            base_model=None if self.base_model is None else rename(self.base_model),
            # "base" names the base model, whatever it is called.
            tokenizer=None if self.tokenizer is None else self.tokenizer.renamed(rename),
        )

    def with_compute_dtype(self, dtype: torch.dtype) -> MergeRecipe:
        """Computes in ``dtype`` and writes what the recipe would have written.

        mergekit's ``dtype`` sets both the compute and the output dtype; overriding only
        the compute dtype (``--compute-dtype``) must not move the output dtype with it.
        """
        out = self.out_dtype
        if out is None and self.dtype_sets_output:
            out = self.compute_dtype
        return dataclasses.replace(self, compute_dtype=dtype, out_dtype=out, dtype_sets_output=False)

    def with_output_dtype(self, dtype: torch.dtype | None) -> MergeRecipe:
        """This recipe with its output dtype written out (``dtype`` the one every merged tensor gets).

        A compute dtype without an output dtype is this tool's ``compute_dtype``, which mergekit
        does not read; with the output dtype written, the pair is mergekit's ``dtype`` and
        ``out_dtype``, which mean the same to both tools.
        """
        if dtype is None or self.compute_dtype is None or self.out_dtype is not None or self.dtype_sets_output:
            return self
        return dataclasses.replace(self, out_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The recipe in YAML-ready form: mergekit's keys, then this tool's own in their section.

        The mergekit keys mean to mergekit what they mean here; the section holds what it
        has no key for (mergekit ignores it), so the same file reruns in either tool.
        """
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        if self.slices:
            data["slices"] = slices_to_dict(self.slices)
        elif self.modules:
            data["modules"] = modules_to_dict(self.modules)
        else:
            data["models"] = [
                {"model": m.model, **({"parameters": dict(m.parameters)} if m.parameters else {})}
                for m in self.models
            ]
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        extension: dict[str, Any] = {}
        if self.compute_dtype is not None:
            # mergekit's dtype is the compute dtype and, without out_dtype, the output's too.
            as_mergekit = self.dtype_sets_output or self.out_dtype is not None
            (data if as_mergekit else extension)["dtype" if as_mergekit else "compute_dtype"] = (
                dtype_name(self.compute_dtype))
        if self.out_dtype is not None:
            data["out_dtype"] = dtype_name(self.out_dtype)
        if self.tokenizer is not None and self.tokenizer.legacy:
            data["tokenizer_source"] = self.tokenizer.source
        elif self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer.to_dict()
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        if self.vocab_mismatch != "error":
            extension["vocab_mismatch"] = self.vocab_mismatch
        if self.expert_layout != "auto":
            extension["expert_layout"] = self.expert_layout
        extension["seed"] = self.seed
        data[EXTENSION_SECTION] = extension
        return data


def load_recipe(path: str | Path) -> MergeRecipe:
    """Reads and validates a YAML recipe file of one document."""
    path = Path(path)
    documents = load_documents(path)
    if len(documents) != 1:
        raise RecipeError([f"the file holds {len(documents)} YAML documents; read it with load_recipe_set "
                           "(mergekit-like merge runs every document)"], source=path)
    return parse_recipe(documents[0], source=path)


def load_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a recipe file, as data (one per ``---`` section)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(["recipe file not found"], source=path) from None
    except IsADirectoryError:
        raise RecipeError(["the recipe is a directory, not a YAML file"], source=path) from None
    except UnicodeDecodeError:
        raise RecipeError(["recipe is not UTF-8 text"], source=path) from None
    try:
        documents = [d for d in _load_yaml_documents(text) if d is not None]
    except _YamlProblem as exc:
        raise RecipeError([str(exc)], source=path) from None
    if not documents:
        raise RecipeError(["the recipe file is empty"], source=path)
    if expanded_size_exceeds(documents, MAX_RECIPE_VALUES):
        raise RecipeError([f"the recipe expands to more than {MAX_RECIPE_VALUES:,} values; {_ALIASES_REPEAT}"],
                          source=path)
    return documents


def parse_recipe(data: Any, *, source: str | Path | None = None) -> MergeRecipe:
    """Validates recipe data (a mapping as YAML gives it) and returns the recipe."""
    problems: list[str] = []
    # First: every later step walks the values, as expanded.
    if expanded_size_exceeds(data, MAX_RECIPE_VALUES):
        raise RecipeError([f"the recipe expands to more than {MAX_RECIPE_VALUES:,} values; {_ALIASES_REPEAT}"],
                          source=source)
    if not isinstance(data, Mapping):
        raise RecipeError([f"a recipe is a mapping of keys, not {type(data).__name__}"], source=source)
    for key in data:
        if key not in RECIPE_KEYS:
            problems.append(f"unknown key '{short_text(str(key))}' (known: {', '.join(sorted(RECIPE_KEYS))})")
    data = _with_extension_section(data, problems)
    method = _method(data.get("merge_method"), problems)
    forms = [key for key in ("models", "slices", "modules") if data.get(key) is not None]
    if len(forms) > 1:
        problems.append(f"give one of models, slices or modules, not {' and '.join(forms)}")
    models = _models(data.get("models"), problems) if forms in ([], ["models"]) else []
    slices = parse_slices(data["slices"], "slices", problems) if "slices" in forms else ()
    modules = parse_modules(data["modules"], problems) if "modules" in forms else {}
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model must be a path or repo id, not {short_repr(base)}")
        base = None
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        problems.append("parameters must be a mapping of name: value")
        parameters = {}
    compute = _dtype(data, "compute_dtype", problems) or _dtype(data, "dtype", problems)
    if "dtype" in data and "compute_dtype" in data:
        problems.append("give either dtype (mergekit) or compute_dtype, not both")
    out = _dtype(data, "out_dtype", problems)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed must be a non-negative integer, not {short_repr(seed)}")
        seed = 0
    vocab_mismatch = data.get("vocab_mismatch", "error")
    if not isinstance(vocab_mismatch, str):
        problems.append(f"vocab_mismatch must be one of {', '.join(VOCAB_MISMATCH)}, not {short_repr(vocab_mismatch)}")
        vocab_mismatch = "error"
    tokenizer = _tokenizer(data, problems)
    expert_layout = data.get("expert_layout", "auto")
    if expert_layout not in EXPERT_LAYOUTS:
        problems.append(f"expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}, not {short_repr(expert_layout)}")
        expert_layout = "auto"
    chat_template = data.get("chat_template")
    if chat_template is not None and (problem := chat_template_problem(chat_template)):
        problems.append(problem)
        chat_template = None
    parameters = _unquoted(parameters, method)
    models = [dataclasses.replace(m, parameters=_unquoted(m.parameters, method)) for m in models]
    slices = _slices_unquoted(slices, method)
    modules = {name: dataclasses.replace(module, slices=_slices_unquoted(module.slices, method),
                                         models=tuple((m, _unquoted(p, method)) for m, p in module.models),
                                         parameters=_unquoted(module.parameters, method))
               for name, module in modules.items()}
    try:
        recipe = MergeRecipe(
            merge_method=method.name if method else str(data.get("merge_method")),
            models=tuple(models),
            base_model=base,
            parameters=dict(parameters),
            compute_dtype=compute,
            out_dtype=out,
            # Only without out_dtype does mergekit's dtype decide the output's.
            dtype_sets_output="dtype" in data and out is None,
            seed=seed,
            tokenizer=tokenizer,
            chat_template=chat_template,
            vocab_mismatch=vocab_mismatch,
            expert_layout=expert_layout,
            slices=slices,
            modules=modules,
        )
    except RecipeError as invalid:
        # The method was reported above already when it is unknown.
        problems += [p for p in invalid.problems if method is not None or not p.startswith(_UNKNOWN_METHOD)]
    if problems:
        raise RecipeError(problems, source=source)
    warn_unusual_values(recipe)
    return recipe


_UNKNOWN_METHOD = "unknown merge_method"


def _tokenizer(data: Mapping[str, Any], problems: list[str]) -> TokenizerSpec | None:
    """The ``tokenizer:`` section, or the older ``tokenizer_source:`` key (mergekit refuses both)."""
    if data.get("tokenizer") is not None and data.get("tokenizer_source") is not None:
        problems.append("give either tokenizer (a section) or tokenizer_source, not both")
        return None
    if data.get("tokenizer_source") is not None:
        source = parse_source(data["tokenizer_source"], "tokenizer_source", problems)
        return TokenizerSpec(source, legacy=True) if source is not None else None
    return parse_tokenizer(data.get("tokenizer"), problems)


def _unknown_method(name: Any, where: str = "") -> str:
    """One line naming an unknown method and the nearest known one, or every one (22 names) if none is near."""
    methods = list(all_methods())
    if not isinstance(name, str):
        return f"{_UNKNOWN_METHOD}{where}: {short_repr(name)} is not a method name (write one, e.g. 'linear')"
    near = difflib.get_close_matches(name, methods, n=1)
    if near:
        return f"{_UNKNOWN_METHOD} {short_text(name)!r}{where}; did you mean {near[0]!r}?"
    return f"{_UNKNOWN_METHOD} {short_text(name)!r}{where} (known: {', '.join(methods)})"


def _unquoted(parameters: Mapping[str, Any], method: MergeMethod | None) -> dict[str, Any]:
    """Parameter values with quoted numbers read as numbers, as mergekit reads them."""
    if method is None:
        return dict(parameters)
    out = {}
    for name, value in parameters.items():
        spec = method.spec(name) if isinstance(name, str) else None
        out[name] = unquoted(value, spec.kind) if spec is not None and spec.kind in (int, float, bool) else value
    return out


def _slices_unquoted(slices: tuple[OutputSlice, ...], method: MergeMethod | None) -> tuple[OutputSlice, ...]:
    out = []
    for piece in slices:
        own = all_methods().get(piece.merge_method) if piece.merge_method else method
        out.append(dataclasses.replace(
            piece, parameters=_unquoted(piece.parameters, own),
            sources=tuple(dataclasses.replace(s, parameters=_unquoted(s.parameters, own)) for s in piece.sources)))
    return tuple(out)


def recipe_problems(recipe: MergeRecipe) -> list[str]:
    """Every problem of ``recipe``: the one validation, run whenever a recipe is made."""
    values = (recipe.parameters, [m.parameters for m in recipe.models])
    if expanded_size_exceeds(values, MAX_RECIPE_VALUES):
        return [f"the recipe's parameters expand to more than {MAX_RECIPE_VALUES:,} values; {_ALIASES_REPEAT}"]
    problems = []
    methods = all_methods()
    if not isinstance(recipe.seed, int) or isinstance(recipe.seed, bool) or recipe.seed < 0:
        problems.append(f"seed must be a non-negative integer, not {short_repr(recipe.seed)}")
    if recipe.vocab_mismatch not in VOCAB_MISMATCH:
        problems.append(f"vocab_mismatch must be one of {', '.join(VOCAB_MISMATCH)}, "
                        f"not {short_repr(recipe.vocab_mismatch)}")
    method = methods.get(recipe.merge_method)
    if method is None:
        problems.append(_unknown_method(recipe.merge_method))
        return problems
    if recipe.layered:
        return problems + _layered_problems(recipe, method)
    return problems + validate_against_method(recipe, method)


def _layered_problems(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    """A slices or modules recipe: its own parameters for its method, then every slice as a recipe."""
    if recipe.models:
        return ["give one of models, slices or modules"]
    problems = []
    scopes = [("parameters", recipe.parameters)] + [(f"modules.{n} parameters", m.parameters)
                                                    for n, m in recipe.modules.items() if m.slices]
    for where, scope in scopes:
        for name, value in scope.items():
            problems += _check_param(method, name, value, where, per_model_scope=False)
    for piece in [*recipe.slices, *(p for m in recipe.modules.values() for p in m.slices)]:
        if piece.merge_method is not None and piece.merge_method not in all_methods():
            problems.append(_unknown_method(piece.merge_method, " in a slice"))
    if problems:
        return problems
    if recipe.sweep_values is not None:
        problems.append(f"a {method.sweep_param} sweep needs a models: recipe; give one value")
    return problems + recipe._slice_views()[1]


def _method(name: Any, problems: list[str]) -> MergeMethod | None:
    methods = all_methods()
    if name is None:
        problems.append(f"merge_method is missing (one of: {', '.join(methods)})")
        return None
    if not isinstance(name, str) or name not in methods:
        problems.append(_unknown_method(name))
        return None
    return methods[name]


def _with_extension_section(data: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    """The recipe with this tool's section's keys read as top-level keys (given once, in one place)."""
    section = data.get(EXTENSION_SECTION)
    if section is None:
        return data
    if not isinstance(section, Mapping):
        problems.append(f"{EXTENSION_SECTION} must be a mapping of {', '.join(sorted(EXTENSION_KEYS))}")
        return data
    merged = {k: v for k, v in data.items() if k != EXTENSION_SECTION}
    for key, value in section.items():
        if key not in EXTENSION_KEYS:
            problems.append(f"{EXTENSION_SECTION}: unknown key '{short_text(str(key))}' "
                            f"(known: {', '.join(sorted(EXTENSION_KEYS))})")
        elif key in data:
            problems.append(f"'{key}' is given both at the top level and under {EXTENSION_SECTION}; give it once")
        else:
            merged[key] = value
    return merged


def _models(raw: Any, problems: list[str]) -> list[ModelEntry]:
    if raw is None:
        problems.append("models is missing: list the models to merge (or give slices or modules)")
        return []
    if not isinstance(raw, list):
        problems.append("models must be a list of {model: PATH, parameters: {...}}")
        return []
    out: list[ModelEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw, 1):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            problems.append(f"models[{i}] needs a 'model' path or repo id")
            continue
        unknown = set(item) - MODEL_KEYS
        if unknown:
            problems.append(f"models[{i}] ({item['model']}): unknown keys {short_repr(sorted(unknown, key=str))}")
        model = item["model"]
        parts = model.split("+")
        if "+" in model and not Path(model).exists() and (len(parts) != 2 or not all(p.strip() for p in parts)):
            problems.append(f"models[{i}]: '{short_text(model)}' is neither a model nor BASE+ADAPTER (one '+')")
        if model in seen:
            problems.append(f"models[{i}]: '{model}' is listed twice")
        seen.add(model)
        params = item.get("parameters") or {}
        if not isinstance(params, Mapping):
            problems.append(f"models[{i}] ({model}): parameters must be a mapping")
            params = {}
        out.append(ModelEntry(model, dict(params)))
    return out


def _dtype(data: Mapping[str, Any], key: str, problems: list[str]) -> torch.dtype | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        # No dtype name is long: a cut name still fails, and its message stays short.
        return parse_dtype(short_text(str(value)))
    except UnsupportedDtypeError as exc:
        problems.append(f"{key}: {exc.what}; {exc.fix}")
        return None


def validate_against_method(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    """Every problem of the recipe's models and parameters for ``method``."""
    problems = _check_models(recipe, method)
    for where, name, value, per_model_scope in _parameter_values(recipe):
        problems += _check_param(method, name, value, where, per_model_scope=per_model_scope)
    problems += _check_required(recipe, method)
    return problems


def _parameter_values(recipe: MergeRecipe) -> Iterator[tuple[str, str, Any, bool]]:
    """(where, name, value, per-model scope) for every parameter value the recipe sets."""
    for name, value in recipe.parameters.items():
        yield "parameters", name, value, False
    for entry in recipe.models:
        for name, value in entry.parameters.items():
            yield f"models '{entry.model}' parameters", name, value, True


def warn_unusual_values(recipe: MergeRecipe) -> None:
    """Logs values the method allows but rarely means (a negative averaging weight, weights that
    nearly cancel), each line once.

    Once, where a recipe is read or built from the command line; never for the copies
    that overrides and defaults make of it.
    """
    for line in dict.fromkeys(_unusual_values(recipe)):
        logger.warning("%s", line)


def _unusual_values(recipe: MergeRecipe) -> Iterator[str]:
    method = recipe.method
    for view in recipe.slice_recipes() if recipe.layered else []:
        if view.slice is not None and view.slice.merge_method not in (None, recipe.merge_method):
            yield (f"{view.label}: merge_method {view.slice.merge_method} is this tool's extension; mergekit reads "
                   f"one method per recipe and would merge this slice with {recipe.merge_method}")
        yield from _unusual_values(view.recipe)
    for where, name, value, _ in _parameter_values(recipe):
        spec = method.spec(name)
        if spec is None or spec.typical is None:
            continue
        typical = spec.typical
        unusual = [v for v in numeric_values(value) if isinstance(v, (int, float)) and not typical.contains(v)]
        if unusual:
            described = "negative" if typical.low == 0 and unusual[0] < 0 else "outside its usual range"
            yield f"{where}: {name} {short_repr(unusual[0])} is {described}; {method.name} {typical.why}"
    uniform = None if recipe.layered or not method.warns else _uniform_params(recipe, method)
    if uniform is not None:
        yield from (line for warn in method.warns if (line := warn(uniform)))


def _uniform_params(recipe: MergeRecipe, method: MergeMethod) -> dict[str, Any] | None:
    """The kernel parameters every tensor gets, when the recipe gives each one plain value (or a default).

    None when some value varies by tensor (a gradient or a filter list): only the plan, tensor by
    tensor, knows those, and it refuses what its checks refuse there.
    """
    shared = [recipe.parameters, *recipe.inherited_parameters]
    resolved: dict[str, Any] = {}
    for key, spec in method.params.items():
        scopes_of = [[entry.parameters, *shared] for entry in recipe.inputs] if spec.per_model else [shared]
        values = []
        for scopes in scopes_of:
            value = next((scope[key] for scope in scopes if key in scope), spec.default)
            # A missing or invalid value is the checker's to refuse.
            if value is inspect.Parameter.empty or isinstance(value, (list, tuple, Mapping)) or _leaf_problem(
                    spec, value):
                return None
            values.append(spec.coerce(value))
        resolved[spec.name] = values if spec.per_model else values[0]
    return resolved


def _check_models(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    problems = []
    name = method.name
    if method.base is BaseUse.REQUIRED and recipe.base_model is None:
        problems.append(f"{name} needs base_model")
    if method.base is BaseUse.NONE and recipe.base_model is not None:
        listed = any(m.model == recipe.base_model for m in recipe.models)
        if not listed:
            problems.append(
                f"{name} does not use base_model; list '{recipe.base_model}' under models "
                "to include it, or remove base_model"
            )
    count = method.model_count_problem(len(recipe.inputs), with_base=recipe.base_model is not None)
    return problems + ([count] if count else [])


def _check_param(method: MergeMethod, name: str, value: Any, where: str, *, per_model_scope: bool) -> list[str]:
    spec = method.spec(name)
    if spec is None:
        return [f"{where}: unknown parameter '{name}' for {method.name} "
                f"(known: {', '.join(sorted(method.params)) or 'none'})"]
    if name in method.ignored_params:
        # Every ignored parameter is one that changes no number in mergekit either.
        logger.debug("%s: '%s' is accepted for mergekit compatibility and has no effect on %s",
                     where, name, method.name)
    if per_model_scope and not spec.per_model:
        return [f"{where}: '{name}' is shared by all models; set it under the global parameters"]
    if value is None and spec.optional:
        return []  # "no value", which the parameter takes (passthrough's scale)
    problem = check_value_form(value)
    if problem:
        return [f"{where}: {name}: {problem}"]
    return [f"{where}: {name}: {p}" for p in (_leaf_problem(spec, leaf) for leaf in numeric_values(value)) if p]


def _leaf_problem(spec: ParamSpec, leaf: Any) -> str | None:
    """Why one unfolded value does not fit ``spec``: the declaration's rule, and no overflow."""
    if spec.kind in (int, float) and too_large_for_float(leaf):
        # Refused before any range check, which compares it with floats and would overflow.
        return _not_finite(leaf)
    return spec.leaf_problem(leaf)


def _not_finite(leaf: Any) -> str:
    return f"{short_repr(leaf)} is not a finite number"


def _check_required(recipe: MergeRecipe, method: MergeMethod) -> list[str]:
    problems = []
    shared = [recipe.parameters, *recipe.inherited_parameters]
    for spec in method.params.values():
        if not spec.required or any(spec.recipe_name in scope for scope in shared):
            continue
        if not spec.per_model:
            problems.append(f"{method.name} needs parameter '{spec.recipe_name}'")
            continue
        missing = [m.model for m in recipe.inputs if spec.recipe_name not in m.parameters]
        if missing:
            problems.append(
                f"{method.name} needs '{spec.recipe_name}' for every model; missing for "
                f"{', '.join(missing)} (set it per model or under the global parameters)"
            )
    return problems


def recipe_from_cli(
    method: str,
    models: Sequence[str],
    *,
    base: str | None = None,
    params: Sequence[str] = (),
    compute_dtype: str | None = None,
    out_dtype: str | None = None,
    seed: int = 0,
) -> MergeRecipe:
    """Builds a recipe from the quick form: ``-p name=value``, ``-p name=v1,v2`` (one value per model).

    A comma-separated value of a per-model parameter gives one value per model
    (in order, base excluded); any value may also be written in YAML
    (``-p t=[0,0.5,1]``).
    """
    problems: list[str] = []
    global_params: dict[str, Any] = {}
    per_model: dict[str, list[Any]] = {}
    spec_by_name = all_methods()[method].params if method in all_methods() else {}
    inputs = [m for m in models if m != base]
    for item in params:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"-p {short_repr(item)}: write parameters as name=value")
            continue
        try:
            value = _parse_cli_value(text)
        except _YamlProblem as exc:
            problems.append(f"-p {short_repr(item)}: {exc}")
            continue
        if expanded_size_exceeds(value, MAX_RECIPE_VALUES):
            problems.append(f"-p {short_text(key)}: the value expands to more than {MAX_RECIPE_VALUES:,} values; "
                            f"{_ALIASES_REPEAT}")
            continue
        spec = spec_by_name.get(key)
        huge = _too_large_leaf(spec, value)
        if huge is not None:
            problems.append(f"-p {short_text(key)}: {huge}")
            continue
        if isinstance(value, tuple):
            if spec is not None and spec.per_model:
                if len(value) != len(inputs):
                    problems.append(f"-p {key}: {len(value)} values for {len(inputs)} models ({', '.join(inputs)})")
                    continue
                per_model[key] = list(value)
                continue
            value = list(value)  # a sweep or a gradient
        global_params[key] = value
    entries = [{"model": m, "parameters": {k: v[inputs.index(m)] for k, v in per_model.items()}}
               if m in inputs else {"model": m} for m in models]
    if base is not None and base not in models:
        entries.append({"model": base})
    data: dict[str, Any] = {"merge_method": method, "models": entries, "seed": seed,
                            "compute_dtype": compute_dtype or "float32"}
    if base is not None:
        data["base_model"] = base
    if global_params:
        data["parameters"] = global_params
    if out_dtype:
        data["out_dtype"] = out_dtype
    if problems:
        raise RecipeError(problems)
    return parse_recipe(data)


def _too_large_leaf(spec: ParamSpec | None, value: Any) -> str | None:
    """The problem of a number in a ``-p`` value too large for a float, reported for the option."""
    if spec is None or spec.kind not in (int, float):
        return None
    parts = value if isinstance(value, tuple) else (value,)
    huge = [leaf for part in parts for leaf in numeric_values(part) if too_large_for_float(leaf)]
    return _not_finite(huge[0]) if huge else None


def _parse_cli_value(text: str) -> Any:
    """A ``-p`` value, read as a recipe's YAML is (or :class:`_YamlProblem`)."""
    text = text.strip()
    if "," in text and not text.startswith(("[", "{")):
        return tuple(_load_yaml(part) for part in text.split(","))
    return _load_yaml(text)


def dump_recipe(recipe: MergeRecipe, extra: Mapping[str, Any] | None = None, *, name: str | None = None) -> str:
    """The recipe as YAML (with ``extra`` keys such as the tool version as comments first).

    ``name`` writes it as a named document of a multi-document recipe.
    """
    data = ({"name": name} if name is not None else {}) | recipe.to_dict()
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text = "".join(f"# {k}: {v}\n" for k, v in extra.items()) + text
    return text
