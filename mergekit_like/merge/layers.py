"""Which tensors make each layer of a checkpoint, found from its tensor names and config.

A layer stack is a prefix under which names carry a layer index (``model.layers.7.mlp...``,
``transformer.h.7...``, ``blocks.7...``), the indices running 0..N-1, and N equal to a
layer count in ``config.json`` (``num_hidden_layers``, ``n_layer``, ``text_config.
num_hidden_layers``, ...). No per-architecture files: any model whose names and config agree
can be sliced. Tensors outside every stack are the model's own (embeddings before the
layers, final norm and head after them), as mergekit's architectures list them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_like.errors import RecipeError

# The first numbered component of a name: "model.layers.7.mlp.experts.3.w1" -> ("model.layers", 7).
_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Config keys that count layers, in the order one is preferred when several hold the count.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth", "encoder_layers",
                    "decoder_layers", "num_decoder_layers")
# Sub-configs of multi-module models (text beside vision) that count their own layers.
NESTED_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")
# Input embeddings come before the layers (mergekit's pre_weights); everything else outside them after.
_BEFORE_LAYERS = re.compile(r"(embed_tokens|embed_in|\bwte\b|\bwpe\b|word_embeddings|position_embeddings|"
                            r"token_type_embeddings|embed_positions|patch_embed|(^|\.)embeddings\.)")
# Lists in a config as long as the layer count that are not per layer.
_NOT_PER_LAYER = {"architectures"}


@dataclass(frozen=True)
class LayerStack:
    """One run of numbered layers: ``{prefix}.{i}.{suffix}`` for i < count."""

    prefix: str
    count: int
    # Where the config counts them ("num_hidden_layers", "text_config.num_hidden_layers"); None: no config.
    config_key: str | None
    suffixes: tuple[frozenset[str], ...]  # the tensor names of each layer, less "{prefix}.{i}."

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


@dataclass(frozen=True)
class LayerLayout:
    """A checkpoint's layer stacks and the tensors outside them."""

    source: str  # the model, for messages
    stacks: tuple[LayerStack, ...]
    before: tuple[str, ...]  # outside every stack, before the layers (input embeddings)
    after: tuple[str, ...]  # outside every stack, after them (final norm, head)

    def only_stack(self) -> LayerStack:
        """The one stack of a single-module model, or :class:`RecipeError` saying why there is none."""
        if len(self.stacks) == 1:
            return self.stacks[0]
        if not self.stacks:
            raise RecipeError([f"'{self.source}': no numbered layers found (names like model.layers.N.* whose "
                               "count config.json gives); slices need a layered model"])
        listed = ", ".join(f"{s.prefix}.N ({s.count} layers)" for s in self.stacks)
        raise RecipeError([f"'{self.source}' has several layer stacks ({listed}); slice each under modules:"])


def find_layout(source: str, names: Iterable[str], config: Mapping[str, Any] | None) -> LayerLayout:
    """The layer stacks of a checkpoint with tensor ``names`` and ``config`` (None: no config.json)."""
    names = list(names)
    groups: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            groups[match["prefix"]][int(match["index"])].add(match["rest"])
    counts = _config_counts(config or {})
    stacks = []
    for prefix, layers in groups.items():
        count = len(layers)
        if sorted(layers) != list(range(count)):
            continue  # not a run from 0: numbered, but not layers
        key = _counting_key(prefix, [k for k, v in counts if v == count])
        if key is None and config:
            continue  # the config counts no such run: a numbered module inside, not a stack
        stacks.append(LayerStack(prefix, count, key, tuple(frozenset(layers[i]) for i in range(count))))
    if not config and len(stacks) > 1:
        stacks = []  # without a config nothing tells which run is the layers
    inside = {s.name(i, rest) for s in stacks for i in range(s.count) for rest in s.suffixes[i]}
    outside = [n for n in names if n not in inside]
    return LayerLayout(source, tuple(stacks), tuple(n for n in outside if _BEFORE_LAYERS.search(n)),
                       tuple(n for n in outside if not _BEFORE_LAYERS.search(n)))


def _counting_key(prefix: str, keys: Sequence[str]) -> str | None:
    """Of the config keys holding a stack's count, the one meant for it: where an encoder, a decoder or a
    vision tower counts its own layers, the key that names the same part as the prefix."""
    def agrees(key: str) -> int:
        parts = ("encoder", "decoder", "vision")
        return sum((part in key) == (part in prefix or (part == "vision" and "visual" in prefix)) for part in parts)

    return max(keys, key=agrees) if keys else None  # max keeps the first (preferred) key among equals


def _config_counts(config: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(key, layer count) pairs of a config, top level first, in preference order."""
    out = [(k, config[k]) for k in LAYER_COUNT_KEYS if _is_count(config.get(k))]
    for nested in NESTED_CONFIGS:
        sub = config.get(nested)
        if isinstance(sub, Mapping):
            out += [(f"{nested}.{k}", sub[k]) for k in LAYER_COUNT_KEYS if _is_count(sub.get(k))]
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def restacked_config(
    config: Mapping[str, Any], key: str, layers: Sequence[tuple[Mapping[str, Any], int]],
) -> dict[str, Any]:
    """``config`` for an output whose layers are ``layers``: (the source model's config, its layer index).

    The layer count at ``key`` becomes ``len(layers)``, and every list beside it with one entry
    per layer (``layer_types``, per-layer windows) is rebuilt from the entries of those layers.
    """
    out = dict(config)
    *parents, leaf = key.split(".")
    scope = out
    for parent in parents:
        scope[parent] = dict(scope[parent])
        scope = scope[parent]
    old_count = scope[leaf]
    scope[leaf] = len(layers)
    if old_count < 2:
        return out  # a one-entry list is not told apart from a per-layer one
    for name, value in list(scope.items()):
        if not isinstance(value, list) or len(value) != old_count or name in _NOT_PER_LAYER:
            continue
        rebuilt = []
        for source_config, index in layers:
            source_scope: Any = source_config
            for parent in parents:
                source_scope = source_scope.get(parent, {}) if isinstance(source_scope, Mapping) else {}
            entries = source_scope.get(name) if isinstance(source_scope, Mapping) else None
            fallback = value[min(index, len(value) - 1)]  # a source without the list: the reference's entry
            rebuilt.append(entries[index] if isinstance(entries, list) and index < len(entries) else fallback)
        scope[name] = rebuilt
    return out


# The top-level layer counts of a language model (a text module's, beside a vision tower's own).
_TEXT_KEYS = LAYER_COUNT_KEYS[:4]


@dataclass(frozen=True)
class Module:
    """One module of a multi-module model: a prefix of tensor names, with its layer stack if it has one."""

    name: str  # the tensor-name prefix, e.g. "language_model", "vision_tower", "multi_modal_projector"
    stack: LayerStack | None
    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        inside = [] if self.stack is None else [self.stack.name(i, rest) for i in range(self.stack.count)
                                                 for rest in sorted(self.stack.suffixes[i])]
        return [*self.before, *inside, *self.after]


def find_modules(layout: LayerLayout) -> dict[str, Module]:
    """The modules of a checkpoint: each layer stack with the tensors under its root prefix, and
    every other root prefix (a projector between towers) as a module without layers.

    A stack's root is the shortest prefix of its name that no other stack shares
    (``language_model``, ``vision_tower``; ``model.encoder`` beside ``model.decoder``).
    Tensors under no module's root (a head at the top level) belong to the text module.
    """
    roots = {_root(stack.prefix, [s.prefix for s in layout.stacks if s is not stack]): stack
             for stack in layout.stacks}
    before: dict[str, list[str]] = {root: [] for root in roots}
    after: dict[str, list[str]] = {root: [] for root in roots}
    text = _text_root(roots)
    for names, into in ((layout.before, before), (layout.after, after)):
        for name in names:
            root = next((r for r in roots if name.startswith(r + ".")), None)
            if root is None:
                top = name.split(".", 1)[0]
                root = text if text is not None and not _has_own_root(top, layout, roots) else top
                before.setdefault(root, [])
                after.setdefault(root, [])
            into[root].append(name)
    return {root: Module(root, roots.get(root), tuple(before[root]), tuple(after[root])) for root in before}


def module_named(modules: Mapping[str, Module], name: str, source: str) -> Module:
    """The module a recipe's ``modules:`` key names: its prefix, or mergekit's name for it
    (``text_decoder``, ``vision_tower``/``vision_model``, ``encoder``, ``decoder``)."""
    if name in modules:
        return modules[name]
    wanted = {"text_decoder": lambda m: m.stack is not None and m.stack.config_key is not None and (
                  m.stack.config_key in _TEXT_KEYS or m.stack.config_key.startswith("text_config.")),
              "vision_tower": lambda m: "vision" in m.name or (m.stack is not None and "vision" in str(
                  m.stack.config_key)),
              "encoder": lambda m: "encoder" in m.name, "decoder": lambda m: "decoder" in m.name}
    wanted["vision_model"] = wanted["vision_tower"]
    test = wanted.get(name)
    found = [m for m in modules.values() if test is not None and test(m)]
    if len(found) == 1:
        return found[0]
    raise RecipeError([f"modules.{name}: '{source}' has no such module (its modules: {', '.join(modules)})"])


def _root(prefix: str, others: Sequence[str]) -> str:
    parts = prefix.split(".")
    for length in range(1, len(parts) + 1):
        root = ".".join(parts[:length])
        if not any(o == root or o.startswith(root + ".") for o in others):
            return root
    return prefix


def _text_root(roots: Mapping[str, LayerStack]) -> str | None:
    texts = [r for r, s in roots.items() if s.config_key in _TEXT_KEYS or str(s.config_key).startswith("text_config.")]
    return texts[0] if len(texts) == 1 else None


def _has_own_root(top: str, layout: LayerLayout, roots: Mapping[str, LayerStack]) -> bool:
    """Whether several tensors share the top-level prefix ``top`` (a module of its own, not a lone head)."""
    outside = [n for n in (*layout.before, *layout.after) if n.split(".", 1)[0] == top]
    return len(outside) > 1 and top not in roots
