"""Checkpoint surgery as declarative rules: dense parameter paths -> MoE parameter paths.

The target tree comes from the MoE model's ``abstract_params`` (shapes only). Each target path
is produced by exactly one rule, tried in order:

1. ``<prefix>/router/w/kernel``               -> a fresh router [d, E] (``Method.router``:
   N(0, ``Recipe.router_init_std``²); virtual groups: [d, E_x] with each column repeated G times)
2. ``<prefix>/expert/<name>/{kernel,bias}``   -> the recipe's method (``Method.experts``)
   applied to the dense MLP at ``<prefix>/<name>/…`` (T5X ``mlp/wi_0`` …, big_vision
   ``MlpBlock_0/Dense_0`` …)
3. ``<prefix>/shared_expert/<name>/{kernel,bias}`` -> the method's shared experts
   (``Method.shared``) of the same dense MLP
4. ``<prefix>/shared_expert_gate/kernel``     -> zeros (the gate starts at sigmoid(0) = 1/2,
   which ``Method.shared`` compensates); a shared expert copied from a source
   (``shared_source``) gets one more router row instead, as mergekit-moe does
5. ``<prefix>/router/selection_bias``         -> zeros (auxiliary-loss-free balancing starts
   unbiased)
6. any other path                             -> copied from the dense checkpoint unchanged

With several sources (``Recipe.sources``, ``sources.py``) rule 2 builds each source's experts
from its own MLP and stacks them in the recipe's expert order, and rule 6 copies the base
source's tensor or averages the sources' (``non_expert``, per parameter group).

Dense paths that no rule consumed (other than the MLPs that became experts) are an error, and
so is any shape that differs from the target's. ``upcycle_tree`` yields ``(path, array)`` one
at a time, so a caller can write each tensor and let it go (streaming).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from sparse_upcycle.upcycle import methods, router_init, sources
from sparse_upcycle.upcycle.recipe import Recipe  # also re-exported: rules.Recipe

ROUTER_RE = re.compile(r"^(?P<prefix>.+)/router/w/kernel$")
EXPERT_RE = re.compile(r"^(?P<prefix>.+)/expert/(?P<name>[^/]+)/(?P<leaf>kernel|bias)$")
SHARED_RE = re.compile(r"^(?P<prefix>.+)/shared_expert/(?P<name>[^/]+)/(?P<leaf>kernel|bias)$")
ZEROS_RE = re.compile(r"^(?P<prefix>.+)/(shared_expert_gate/kernel|router/selection_bias)$")


def _layer_index(prefix: str) -> int:
    """A stable small integer per MoE layer prefix, for per-layer randomness."""
    numbers = [int(n) for n in re.findall(r"_(\d+)(?=/|$)", prefix)]
    stack = 1 if prefix.startswith("decoder") else 0
    return stack * 100_000 + (numbers[0] if numbers else 0)


def _mlp_names(names: set[str]) -> methods.MlpNames:
    if {"wi_0", "wi_1", "wo"} <= names:
        return methods.T5X_GATED
    if {"wi", "wo"} <= names:
        return methods.T5X_PLAIN
    if {"Dense_0", "Dense_1"} <= names:
        return methods.BIG_VISION
    raise ValueError(f"unrecognised MLP parameter names {sorted(names)}")


def _dense_mlp(dense: Mapping, prefix: str) -> tuple[dict, methods.MlpNames]:
    leaves = {p[len(prefix) + 1 :]: p for p in dense if p.startswith(prefix + "/")}
    names = _mlp_names({rest.split("/")[0] for rest in leaves})
    mlp = {}
    for rest, path in leaves.items():
        name, leaf = rest.split("/", 1)
        mlp[name if leaf == "kernel" else f"{name}_bias"] = path
    return mlp, names


def _experts(dense, read, prefix, recipe: Recipe, shared_gated=None) -> dict[str, np.ndarray]:
    """The routed experts of the dense MLP at ``prefix`` or, with ``shared_gated`` set (whether
    the layer gates them), its shared experts."""
    paths, names = _dense_mlp(dense, prefix)
    mlp = {key: read(path) for key, path in paths.items()}
    if names is methods.BIG_VISION and "Dense_0_bias" not in mlp:
        names = methods.MlpNames(("Dense_0",), "Dense_1")
    method = methods.get(recipe.method)
    if shared_gated is not None:
        return method.shared(mlp, names, recipe, _layer_index(prefix), shared_gated)
    return method.experts(mlp, names, recipe, _layer_index(prefix))


def _source_experts(dense, reads, prefix, recipe: Recipe) -> dict[str, np.ndarray]:
    """The routed experts of one MoE layer from several sources: each source's experts from
    its own MLP (the recipe's method, with that source's random stream), then stacked in the
    recipe's expert order. Holds this layer's MLP of every source at once, no more."""
    assignment = sources.expert_assignment(recipe)
    reset = (*sources.SETTINGS, *router_init.SETTINGS)  # one source, one MLP, no prompts
    single = dataclasses.replace(recipe, **{f: _DEFAULTS[f] for f in reset})
    layer = _layer_index(prefix)
    per_source = {}
    for s in sorted(set(assignment)):
        sub = dataclasses.replace(single, num_experts=assignment.count(s))
        paths, names = _dense_mlp(dense, prefix)
        mlp = {key: reads[s](path) for key, path in paths.items()}
        if names is methods.BIG_VISION and "Dense_0_bias" not in mlp:
            names = methods.MlpNames(("Dense_0",), "Dense_1")
        per_source[s] = methods.get(recipe.method).experts(
            mlp, names, sub, sources.source_layer(layer, s)
        )
    return sources.stack_experts(per_source, assignment)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Recipe)}


def _router(shape, prefix, recipe: Recipe, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    if recipe.router_init in router_init.PROMPTED:
        if prefix not in rows:
            raise ValueError(f"router_init={recipe.router_init}: no router rows for {prefix}")
        return rows[prefix][:, : shape[1]]  # with a shared_source, its row comes last
    layer = _layer_index(prefix)
    rng = np.random.default_rng([recipe.seed, layer, 0, 999])
    if recipe.router_init == "uniform_random":
        return router_init.uniform(tuple(shape), rng)
    return methods.get(recipe.method).router(tuple(shape), layer, recipe, rng)


_GATE = "shared_expert_gate/kernel"


def _shared_gate(shape, prefix, recipe: Recipe, rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """The gate vector g [d, 1] of a copied shared expert (``shared_source``), made as one
    more router row, as mergekit-moe makes it: its prompts' row (the last of
    ``router_init.router_rows``), or a draw of the random modes from a stream of its own."""
    if recipe.router_init in router_init.PROMPTED:
        if prefix not in rows:
            raise ValueError(f"router_init={recipe.router_init}: no router rows for {prefix}")
        return rows[prefix][:, -1:]
    rng = np.random.default_rng([recipe.seed, _layer_index(prefix), 1, 999])
    if recipe.router_init == "uniform_random":
        return router_init.uniform(tuple(shape), rng)
    return rng.normal(0.0, recipe.router_init_std, tuple(shape)).astype(np.float32)


def plan(dense_paths, target_paths) -> list[tuple[str, str, str]]:
    """``(target path, rule, source)`` for every target path, checked before any tensor is read:
    every target has a source, and every dense path has a place."""
    dense_paths = set(dense_paths)
    steps, used = [], set()
    for path in target_paths:
        if m := ROUTER_RE.match(path):
            steps.append((path, "router", m["prefix"]))
        elif ZEROS_RE.match(path):
            steps.append((path, "zeros", path))
        elif m := EXPERT_RE.match(path) or SHARED_RE.match(path):
            prefix = m["prefix"]
            sources = {p for p in dense_paths if p.startswith(prefix + "/")}
            source = f"{prefix}/{m['name']}/{m['leaf']}"
            if source not in sources:
                raise ValueError(
                    f"{path}: the dense checkpoint has no {source!r} to build "
                    "experts from (is the model config the dense model's?)"
                )
            used |= sources
            steps.append((path, "expert" if EXPERT_RE.match(path) else "shared", prefix))
        elif path in dense_paths:
            used.add(path)
            steps.append((path, "copy", path))
        else:
            raise ValueError(
                f"the dense checkpoint has no {path!r}, which the model needs "
                "(is the model config the dense model's?)"
            )
    unused = sorted(dense_paths - used)
    if unused:
        more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
        raise ValueError(f"dense parameters the MoE model has no place for: {unused[:5]}{more}")
    return steps


def upcycle_tree(
    dense_paths,
    read: Callable[[str], np.ndarray],
    target: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    recipe: Recipe,
    reads: Sequence[Callable[[str], np.ndarray]] = (),
    router_rows: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(path, array)`` for every target path, one MoE layer's experts in memory at a
    time.

    Args:
      dense_paths: the dense checkpoint's flat ``/`` paths.
      read: loads one dense tensor by path (the base source's, with several sources).
      target: flat MoE paths -> (shape, dtype), from the MoE model's abstract params.
      recipe: the upcycling recipe.
      reads: with ``recipe.sources``, one reader per source, in the recipe's order (the
        sources' paths and shapes checked alike beforehand: ``sources.check_compatible``).
      router_rows: with a prompted ``recipe.router_init``, each MoE layer's router kernel
        (``router_init.router_rows``), by layer prefix.
    """
    tensors = UpcycledTensors(dense_paths, read, target, recipe, reads, router_rows)
    for path in tensors.keys():
        yield path, tensors.read(path)


class UpcycledTensors:
    """The MoE checkpoint as a reader: ``keys()`` in target order, ``read(path)`` computes one
    tensor on demand (``upcycle_tree``'s arguments; everything is checked on construction,
    before any tensor is read). The experts of the MoE layer last asked for are kept, so a
    reader that takes a layer's expert tensors one after another (an HF export) builds them
    once; asking for another layer's lets them go."""

    def __init__(
        self,
        dense_paths,
        read: Callable[[str], np.ndarray],
        target: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        recipe: Recipe,
        reads: Sequence[Callable[[str], np.ndarray]] = (),
        router_rows: Mapping[str, np.ndarray] | None = None,
    ):
        self._dense = list(dense_paths)
        self._read, self._target, self._recipe = read, target, recipe
        self._reads, self._rows = reads, router_rows or {}
        self._multi = bool(recipe.sources)
        if self._multi and len(reads) != len(recipe.sources):
            raise ValueError(f"{len(recipe.sources)} sources in the recipe, {len(reads)} readers")
        self._modes = sources.parse_non_expert(recipe.non_expert) if self._multi else {}
        self._weights = sources.normalised_weights(recipe) if self._multi else ()
        steps = plan(self._dense, target)
        if any(rule == "shared" for _, rule, _ in steps) and not recipe.method_impl.shared_experts(
            recipe
        ):
            recipe.method_impl.shared({}, methods.T5X_GATED, recipe, 0, False)  # its refusal
        self._steps = {path: (rule, source) for path, rule, source in steps}
        self._cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def keys(self) -> list[str]:
        return list(self._steps)

    def read(self, path: str) -> np.ndarray:
        rule, source = self._steps[path]
        shape, dtype = self._target[path]
        recipe = self._recipe
        if rule == "router":
            value = _router(shape, source, recipe, self._rows)
        elif rule == "zeros" and recipe.shared_source >= 0 and path.endswith(_GATE):
            value = _shared_gate(shape, path[: -len(_GATE) - 1], recipe, self._rows)
        elif rule == "zeros":
            value = np.zeros(shape, np.float32)
        elif rule in ("expert", "shared"):
            value = self._layer_experts(rule, source, path)
        elif self._multi and self._modes[sources.parameter_group(source)] == "average":
            values = [np.asarray(r(source)) for r in self._reads]
            check_float(path, values[0].dtype, dtype)
            value = sources.average(values, self._weights)
        else:
            value = self._read(source)
        value = np.asarray(value)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{path}: the checkpoint gives shape {tuple(value.shape)}, the "
                f"model config expects {tuple(shape)}"
            )
        check_float(path, value.dtype, dtype)
        return value.astype(dtype, copy=False)

    def _layer_experts(self, rule: str, prefix: str, path: str) -> np.ndarray:
        if (rule, prefix) not in self._cache:
            if any(cached != prefix for _, cached in self._cache):
                self._cache.clear()  # another layer: one layer's experts in memory
            gated = f"{prefix}/shared_expert_gate/kernel" in self._target
            if self._multi and rule == "shared":  # sources.validate: copy's shared_source
                s = self._recipe.shared_source
                built = _experts(self._dense, self._reads[s], prefix, self._recipe, gated)
            elif self._multi:
                built = _source_experts(self._dense, self._reads, prefix, self._recipe)
            else:
                built = _experts(
                    self._dense,
                    self._read,
                    prefix,
                    self._recipe,
                    gated if rule == "shared" else None,
                )
            self._cache[rule, prefix] = built
        m = EXPERT_RE.match(path) or SHARED_RE.match(path)
        assert m is not None  # plan() gave this path its rule by these patterns
        return self._cache[rule, prefix][
            m["name"] if m["leaf"] == "kernel" else f"{m['name']}_bias"
        ]


def check_float(path: str, got, want) -> None:
    """A parameter the model holds in floating point must come as floating point (an integer
    or boolean tensor in its place is a wrong or corrupt checkpoint, not something to cast)."""
    if np.dtype(want).kind == "f" and np.dtype(got).kind not in "fV":  # V: bfloat16 and kin
        raise ValueError(
            f"{path}: the checkpoint holds {np.dtype(got)} values; the model expects a "
            f"floating-point tensor ({np.dtype(want)})"
        )


DENSE_PARAM_RE = re.compile(r"^(?P<prefix>.+)/(?P<name>[^/]+)/(?P<leaf>kernel|bias)$")


def tile_optimizer_state(
    slot_keys,
    read_slot: Callable[[str], np.ndarray],
    target: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    recipe: Recipe,
) -> Iterator[tuple[str, np.ndarray]]:
    """The dense optimizer's per-parameter slots (``<param path>/<slot>``, e.g. T5X
    Adafactor's ``…/wi_0/kernel/v_row``) mapped onto the MoE tree (``optimizer=tile``).

    A parameter copied unchanged keeps its slots. A dense MLP parameter that became experts
    (``<prefix>/<name>/kernel`` -> ``<prefix>/expert/<name>/kernel``) gets each slot with a
    leading expert axis, every expert holding the dense moments (Komatsuzaki et al. 2023, §3:
    the vision models keep the optimizer state); size-1 placeholder slots (T5X stores unused
    factored slots as shape ``(1,)``) stay as they are. Routers are new and get no slots."""
    experts = recipe.total_experts
    for key in slot_keys:
        param, _, slot = key.rpartition("/")
        value = np.asarray(read_slot(key))
        if param in target:
            yield key, value
            continue
        m = DENSE_PARAM_RE.match(param)
        expert_path = m and f"{m['prefix']}/expert/{m['name']}/{m['leaf']}"
        if not m or expert_path not in target:
            raise ValueError(
                f"optimizer slot {key!r} belongs to no parameter of the MoE model "
                "(is the model config the dense model's?)"
            )
        if value.size > 1:
            value = np.broadcast_to(value[None], (experts, *value.shape))
        yield f"{expert_path}/{slot}", value
