"""Several dense sources in one recipe (Branch-Train-MiX, mergekit-moe).

``Recipe.sources`` lists dense checkpoints of one architecture. Each expert names the source
it is built from (``expert_sources``: one index per expert; by default ``experts_per_source``
consecutive experts of each source, in order). Every other parameter comes from the base source
(``base_source``) or is the weighted mean over the sources (``source_weights``, uniform by
default; normalised to sum to one), chosen per parameter group with ``non_expert``:

* ``"base"`` or ``"average"`` for every group, or
* ``"GROUP=MODE,..."`` with groups ``embedding`` (token embeddings, output projection, ViT
  patch/position embeddings and head), ``attention`` (projections, T5 relative position
  bias), ``norm`` (every normalisation's scale/bias), ``mlp`` (the MLPs of layers that stay
  dense) and ``other``; a group not named takes ``base``.

Branch-Train-MiX (Sukhbaatar et al. 2024, §2.2: "MiX") averages every non-expert parameter
(``non_expert="average"``); mergekit-moe takes them from its ``base_model``
(``non_expert="base"``). The experts of a source are built by the recipe's method from that
source's MLP (``copy``, or Drop-Upcycling's ``drop`` with randomness drawn per source).

``shared_source`` s >= 0 (``copy`` only) adds one shared expert per MoE layer, a copy of
source s's MLP, beside the routed ones: mergekit-moe's Qwen2-MoE output
(``architecture: qwen`` with one ``shared_experts`` entry), whose shared expert sits behind
Qwen2-MoE's gate sigmoid(x·g); ``g`` starts as one more router row (``rules``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sparse_upcycle.upcycle.recipe import Recipe

SETTINGS = (
    "sources",
    "expert_sources",
    "experts_per_source",
    "base_source",
    "non_expert",
    "source_weights",
    "shared_source",
)
GROUPS: tuple[str, ...] = ("embedding", "attention", "norm", "mlp", "other")
MODES = ("base", "average")
METHODS = ("copy", "drop")  # methods whose experts are whole copies of one source's MLP
_EMBEDDING = {"token_embedder", "logits_dense", "embedding", "cls", "pos_embedding", "head"}
# A seed offset per source, so that per-expert randomness (noise, Drop-Upcycling's units)
# differs between sources; source 0 draws exactly what a single-source recipe draws.
_SOURCE_STREAM = 10_000_000


def parameter_group(path: str) -> str:
    """The ``non_expert`` group of a parameter path (see module docstring)."""
    parts = path.split("/")
    if any("norm" in p.lower() for p in parts):
        return "norm"
    if any(p in _EMBEDDING for p in parts):
        return "embedding"
    if any("attention" in p.lower() or p == "relpos_bias" for p in parts):
        return "attention"
    if any(p == "mlp" or p.startswith("MlpBlock") for p in parts):
        return "mlp"
    return "other"


def parse_non_expert(spec: str) -> dict[str, str]:
    """``non_expert`` as ``{group: mode}`` for every group (ValueError naming a bad part)."""
    if not isinstance(spec, str):
        raise ValueError(f"upcycle.non_expert must be a string, got {spec!r}")
    if spec in MODES:
        return dict.fromkeys(GROUPS, spec)
    out = dict.fromkeys(GROUPS, "base")
    for part in spec.split(","):
        group, eq, mode = (s.strip() for s in part.partition("="))
        if not eq or group not in GROUPS or mode not in MODES:
            raise ValueError(
                f"upcycle.non_expert: {part.strip()!r} is not GROUP=MODE with GROUP one of "
                f"{GROUPS} and MODE one of {MODES} (or give just base / average)"
            )
        out[group] = mode
    return out


def expert_assignment(recipe: Recipe) -> tuple[int, ...]:
    """The source index of every expert (empty for a single-source recipe)."""
    if not recipe.sources:
        return ()
    if recipe.expert_sources:
        return tuple(int(s) for s in recipe.expert_sources)
    n = recipe.experts_per_source
    return tuple(s for s in range(len(recipe.sources)) for _ in range(n))


def normalised_weights(recipe: Recipe) -> tuple[float, ...]:
    """``source_weights`` summing to one (uniform when not given)."""
    w = recipe.source_weights or (1.0,) * len(recipe.sources)
    total = float(sum(w))
    return tuple(float(x) / total for x in w)


def validate(recipe: Recipe) -> None:
    """The multi-source fields of ``recipe`` (ValueError naming the field); a recipe without
    ``sources`` must leave them at their defaults."""
    if not isinstance(recipe.sources, (tuple, list)):
        raise ValueError(f"upcycle.sources must be a list of paths, got {recipe.sources!r}")
    n = len(recipe.sources)
    if not n:
        defaults = (
            ("expert_sources", ()),
            ("source_weights", ()),
            ("base_source", 0),
            ("experts_per_source", 1),
            ("non_expert", "base"),
            ("shared_source", -1),
        )
        for name, default in defaults:
            if getattr(recipe, name) != default:
                raise ValueError(f"upcycle.{name} needs upcycle.sources (several dense sources)")
        return
    for i, path in enumerate(recipe.sources):
        if not isinstance(path, str) or not path:
            raise ValueError(f"upcycle.sources[{i}] must be a non-empty path, got {path!r}")
    if recipe.method not in METHODS:
        raise ValueError(
            f"upcycle.sources builds each expert from one source's MLP: method must be one of "
            f"{METHODS}, got {recipe.method!r}"
        )
    if recipe.optimizer != "reset":
        raise ValueError("upcycle.sources: optimizer must be reset (whose moments would tile?)")
    if not isinstance(recipe.base_source, int) or not 0 <= recipe.base_source < n:
        raise ValueError(f"upcycle.base_source must be in 0..{n - 1}, got {recipe.base_source!r}")
    if recipe.expert_sources:
        for e, s in enumerate(recipe.expert_sources):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
                raise ValueError(
                    f"upcycle.expert_sources[{e}] must be a source index in 0..{n - 1}, got {s!r}"
                )
    elif recipe.experts_per_source < 1:
        raise ValueError(
            f"upcycle.experts_per_source must be >= 1, got {recipe.experts_per_source}"
        )
    given = len(expert_assignment(recipe))
    if recipe.num_experts != given:
        how = (
            "len(upcycle.expert_sources)"
            if recipe.expert_sources
            else f"{n} sources × experts_per_source {recipe.experts_per_source}"
        )
        raise ValueError(
            f"upcycle.num_experts={recipe.num_experts} but the sources give {given} experts "
            f"({how}); set upcycle.num_experts={given}"
        )
    if recipe.source_weights:
        w = recipe.source_weights
        if len(w) != n:
            raise ValueError(f"upcycle.source_weights has {len(w)} weights for {n} sources")
        bad = [x for x in w if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0]
        if bad or not sum(w) > 0:
            raise ValueError(
                f"upcycle.source_weights must be finite numbers >= 0 with a positive sum, got {w}"
            )
    parse_non_expert(recipe.non_expert)
    s = recipe.shared_source
    if isinstance(s, bool) or not isinstance(s, int) or not -1 <= s < n:
        raise ValueError(f"upcycle.shared_source must be -1 (none) or in 0..{n - 1}, got {s!r}")
    if s >= 0 and recipe.method != "copy":
        raise ValueError(
            f"upcycle.shared_source (a shared expert copied from a source) needs method=copy, "
            f"got {recipe.method!r}"
        )


def check_readers(names: Sequence[str], readers: Sequence) -> None:
    """``check_compatible`` of opened checkpoint readers (their keys, shapes and configs)."""
    check_compatible(
        names, [r.keys() for r in readers], [r.shape for r in readers], [r.config for r in readers]
    )


def check_compatible(
    names: Sequence[str],
    keys: Sequence[Sequence[str]],
    shape: Sequence[Callable[[str], tuple[int, ...]]],
    configs: Sequence[object | None],
) -> None:
    """Every source has the base's (the first's) parameter paths, shapes and model config
    (where both carry one); ValueError naming the first mismatch. Reads no tensor."""
    base_keys = set(keys[0])
    for i in range(1, len(names)):
        mine = set(keys[i])
        if mine != base_keys:
            missing, extra = sorted(base_keys - mine), sorted(mine - base_keys)
            what = (
                f"lacks {missing[0]!r}, which {names[0]} has"
                if missing
                else f"has {extra[0]!r}, which {names[0]} lacks"
            )
            raise ValueError(f"{names[i]}: {what}; the sources must be one architecture")
        for key in sorted(base_keys):
            a, b = tuple(shape[0](key)), tuple(shape[i](key))
            if a != b:
                raise ValueError(
                    f"{names[i]}: {key} has shape {b}, {names[0]} has {a}: the sources must "
                    "be one architecture"
                )
        if configs[0] is not None and configs[i] is not None and configs[i] != configs[0]:
            field = _first_difference(configs[0], configs[i])
            raise ValueError(
                f"{names[i]}: its model config differs from {names[0]}'s in {field}; the "
                "sources must be one architecture"
            )


def _first_difference(a, b) -> str:
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x != y:
                return f"{f.name} ({y!r} vs {x!r})"
    return f"its type ({type(b).__name__} vs {type(a).__name__})"


def average(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of one parameter over the sources, accumulated in float64 (so the
    mean of identical tensors is the tensor itself, bit for bit, after the cast back)."""
    acc = np.zeros(np.shape(values[0]), np.float64)
    for x, w in zip(values, weights, strict=True):
        acc += w * np.asarray(x, np.float64)
    return acc


def stack_experts(
    per_source: Mapping[int, Mapping[str, np.ndarray]], assignment: Sequence[int]
) -> dict[str, np.ndarray]:
    """Expert ``e`` of the MoE layer is the next unused expert of source ``assignment[e]``;
    ``per_source[s]`` holds that source's experts stacked ``{name: [n_s, ...]}``."""
    if len(set(assignment)) == 1:  # one source's experts, in order: as they are (views)
        return dict(per_source[assignment[0]])
    taken = dict.fromkeys(per_source, 0)
    rows = []
    for s in assignment:
        rows.append((s, taken[s]))
        taken[s] += 1
    names = next(iter(per_source.values())).keys()
    return {n: np.stack([per_source[s][n][j] for s, j in rows]) for n in names}


def source_layer(layer: int, source: int) -> int:
    """The per-layer random stream of ``source`` (see ``_SOURCE_STREAM``)."""
    return layer + _SOURCE_STREAM * source
