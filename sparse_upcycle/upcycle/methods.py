"""Upcycling methods: one dense MLP (numpy arrays) -> E stacked experts, deterministically.

A dense MLP is given as ``{name: array}`` with input kernels [d, f] (``wi_0``/``wi_1``, ``wi``
or ``Dense_0``), optional input biases [f], an output kernel [f, d] (``wo`` or ``Dense_1``) and
an optional output bias [d]; ``MlpNames`` says which is which. Every method returns the same
names with a leading expert axis.

* ``copy_experts`` — Komatsuzaki et al. 2023 (Sparse Upcycling, §3.1): every expert is the
  dense MLP, optionally plus N(0, noise_std²) noise.
* ``virtual_group_experts`` — He et al. 2024 ("Upcycling Large Language Models into Mixture of
  Experts", §3): E = E_x·G fine-grained experts of width f/G. Shard s of the dense hidden
  units (columns of the input kernels, rows of the output kernel) goes to every expert j with
  j mod G = s, and the router's columns are repeated G times (``virtual_group_router``), so
  the G experts of a run score alike and top-K (K % G == 0) picks whole runs, each run summing
  to the dense MLP. Weight scaling undoes the routing weights' shrinkage at a uniform router.
  With ``softmax_then_topk`` every expert gets p = 1/E (E = E_x·G), K/G runs are picked and
  each run sums to the dense MLP, so the output is (K/G)·(1/E)·MLP = K/(E_x·G²)·MLP, hence
  a = E_x·G²/K; with ``topk_then_softmax`` each of the K picks gets 1/K and the output is
  (K/G)·(1/K)·MLP = MLP/G, hence a = G. The paper's ``scaling="paper"`` multiplies each of
  the three gated matrices by a^(1/3) (or both matrices of a plain MLP by a^(1/2)), which is
  exact only for homogeneous activations; ``scaling="exact"`` puts all of a on the output
  kernel, exact for any activation.
* ``drop_upcycle_experts`` — Nakamura et al. 2025 (Drop-Upcycling, §3): per expert, a random
  set of ⌊r·f⌋ hidden units (one set shared by the input columns and output rows) is
  re-initialised from N(mean, std) of the original matrix; the rest is copied.

Randomness comes from ``numpy.random.default_rng([seed, layer, expert, purpose])``, so a
recipe's seed fixes every expert of every layer, independent of processing order.

Each method is also data: a ``Method`` subclass (``Copy``, ``VirtualGroup``, ``Drop``) in the
registry ``METHODS``, owning the recipe settings it reads, their validation, the expert count,
expert and router construction, the model routing it needs and whether it is meant to keep the
dense function. ``rules.py`` and ``Recipe`` only ask ``get(recipe.method)``; a new method is
one subclass and one ``register`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from sparse_upcycle.moe import EXPERT_NAMING
from sparse_upcycle.routing import ORDERINGS

if TYPE_CHECKING:
    from sparse_upcycle.models.moe_config import MoeConfig
    from sparse_upcycle.upcycle.recipe import Recipe

SCALINGS = ("paper", "exact", "none")
DROP_STATS = ("matrix", "none")


@dataclasses.dataclass(frozen=True)
class MlpNames:
    """Which entries of an MLP dict are input kernels, the output kernel, and biases."""

    inputs: tuple[str, ...] = ("wi_0", "wi_1")
    output: str = "wo"
    input_biases: tuple[str, ...] = ()
    output_bias: str | None = None

    def all(self) -> tuple[str, ...]:
        extra = (self.output_bias,) if self.output_bias else ()
        return (*self.inputs, *self.input_biases, self.output, *extra)


# The dense MLPs the MoE layer mirrors, in its own vocabulary (``moe.EXPERT_NAMING``).
_T5X_INPUTS, _T5X_PLAIN, _T5X_OUT = EXPERT_NAMING["t5x"]
_, _BV_IN, _BV_OUT = EXPERT_NAMING["big_vision"]
T5X_GATED = MlpNames(tuple(_T5X_INPUTS), _T5X_OUT)
T5X_PLAIN = MlpNames((_T5X_PLAIN,), _T5X_OUT)
BIG_VISION = MlpNames((_BV_IN,), _BV_OUT, (f"{_BV_IN}_bias",), f"{_BV_OUT}_bias")


def _rng(seed: int, layer: int, expert: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, layer, expert, purpose])


def _check(mlp: Mapping[str, np.ndarray], names: MlpNames) -> tuple[int, int]:
    missing = [n for n in names.all() if n not in mlp]
    if missing:
        raise ValueError(f"dense MLP lacks {missing}; has {sorted(mlp)}")
    shapes = {n: tuple(np.shape(mlp[n])) for n in (*names.inputs, names.output)}
    bad = [n for n, s in shapes.items() if len(s) != 2]
    if bad:
        raise ValueError(f"dense MLP kernel {bad[0]} has shape {shapes[bad[0]]}, expected 2-D")
    # d from the output kernel's columns, f from its rows: the inputs must be [d, f]. When
    # they disagree, every kernel is named: the one that is wrong is not always the first.
    f, d = shapes[names.output]
    if any(shapes[n] != (d, f) for n in names.inputs):
        shown = ", ".join(f"{n} {shapes[n]}" for n in shapes)
        raise ValueError(
            f"the dense MLP's kernels disagree ({shown}): the input kernels must be [d, f] and "
            f"the output kernel [f, d]; one of them does not come from this model"
        )
    return d, f


def copy_experts(
    mlp,
    num_experts: int,
    names: MlpNames = T5X_GATED,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
    layer: int = 0,
) -> dict[str, np.ndarray]:
    """Every expert a copy of the dense MLP (+ optional Gaussian noise on the kernels)."""
    _check(mlp, names)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    out = {}
    for i, name in enumerate(names.all()):
        w = np.asarray(mlp[name])
        stacked = np.repeat(w[None], num_experts, axis=0)
        if noise_std > 0 and name in (*names.inputs, names.output):
            noise = _rng(seed, layer, 0, 100 + i).normal(0.0, noise_std, stacked.shape)
            stacked = (stacked + noise).astype(w.dtype)
        out[name] = stacked
    return out


def virtual_group_scale(expansion: int, granularity: int, k: int, ordering: str) -> float:
    """The activation scale a of He et al. 2024 (see module docstring)."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if ordering == "softmax_then_topk":
        return expansion * granularity**2 / k
    return float(granularity)


def recipe_name(expansion: int, granularity: int, k: int) -> str:
    """The paper's notation, e.g. E8G1T2."""
    return f"E{expansion}G{granularity}T{k}"


def virtual_group_experts(
    mlp,
    expansion: int,
    granularity: int,
    k: int,
    names: MlpNames = T5X_GATED,
    *,
    ordering: str = "softmax_then_topk",
    scaling: str = "paper",
) -> dict[str, np.ndarray]:
    """E_x·G experts of width f/G; expert j holds hidden shard j mod G, scaled by ``scaling``."""
    d, f = _check(mlp, names)
    if names.input_biases or names.output_bias:
        raise ValueError("virtual_group is defined for bias-free (LLM) MLPs")
    if expansion < 1 or granularity < 1:
        raise ValueError(f"expansion and granularity must be >= 1, got {expansion}, {granularity}")
    if k % granularity:
        raise ValueError(
            f"virtual groups need top-K with K % G == 0 so that whole groups are "
            f"picked; got K={k}, G={granularity}"
        )
    if f % granularity:
        raise ValueError(f"the dense hidden width f={f} must be divisible by G={granularity}")
    if not 1 <= k <= expansion * granularity:
        raise ValueError(f"K={k} must be in [1, E_x·G={expansion * granularity}]")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    a = virtual_group_scale(expansion, granularity, k, ordering) if scaling != "none" else 1.0
    n_mats = len(names.inputs) + 1
    per_matrix = a ** (1.0 / n_mats) if scaling == "paper" else 1.0
    fs = f // granularity
    num_experts = expansion * granularity
    shard = np.arange(num_experts) % granularity
    out = {}
    for name in names.inputs:
        w = np.asarray(mlp[name])
        shards = w.reshape(d, granularity, fs).transpose(1, 0, 2)  # [G, d, f/G]
        out[name] = (shards[shard] * per_matrix).astype(w.dtype)
    wo = np.asarray(mlp[names.output])
    shards = wo.reshape(granularity, fs, d)
    out_scale = a if scaling == "exact" else per_matrix
    out[names.output] = (shards[shard] * out_scale).astype(wo.dtype)
    return out


def virtual_group_router(kernel_dEx: np.ndarray, granularity: int) -> np.ndarray:
    """Repeat each router column G times: [d, E_x] -> [d, E_x·G], runs of G share a column."""
    return np.repeat(np.asarray(kernel_dEx), granularity, axis=1)


def drop_upcycle_experts(
    mlp,
    num_experts: int,
    ratio: float,
    names: MlpNames = T5X_GATED,
    *,
    seed: int = 0,
    layer: int = 0,
    stats: str = "matrix",
) -> dict[str, np.ndarray]:
    """Copy, then re-initialise ⌊ratio·f⌋ hidden units per expert (Drop-Upcycling).

    ``stats="matrix"`` draws from N(mean, std) of each original matrix (the paper's choice);
    ``"none"`` from N(0, std). Biases of dropped units are re-initialised to zero."""
    _, f = _check(mlp, names)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop ratio r must be in [0, 1], got {ratio}")
    if stats not in DROP_STATS:
        raise ValueError(f"stats must be one of {DROP_STATS}, got {stats!r}")
    out = copy_experts(mlp, num_experts, names)
    n_drop = int(np.floor(ratio * f))
    for e in range(num_experts):
        units = np.sort(_rng(seed, layer, e, 0).choice(f, size=n_drop, replace=False))
        for i, name in enumerate((*names.inputs, names.output)):
            w = np.asarray(mlp[name], np.float64)
            mean = w.mean() if stats == "matrix" else 0.0
            draw = _rng(seed, layer, e, 1 + i)
            if name == names.output:
                out[name][e, units, :] = draw.normal(mean, w.std(), (n_drop, w.shape[1]))
            else:
                out[name][e, :, units] = draw.normal(mean, w.std(), (n_drop, w.shape[0]))
        for name in names.input_biases:
            out[name][e, units] = 0.0
    return out


# --------------------------------------------------------------------------------------------
# Methods as data: the registry
# --------------------------------------------------------------------------------------------


class Method:
    """One upcycling method. Subclasses set ``name`` and ``settings`` and implement
    ``experts``; the defaults suit methods that build ``recipe.num_experts`` full-width experts
    behind a fresh N(0, router_init_std²) router and change the dense function."""

    name: str = ""
    settings: tuple[str, ...] = ()  # the Recipe fields it reads beyond recipe.COMMON_SETTINGS
    # Whether every expert equals the dense MLP, so the dense optimizer moments fit every expert
    # (``optimizer=tile``).
    tiles_optimizer: bool = False

    def validate(self, recipe: Recipe) -> None:
        """Raise ValueError if ``recipe`` does not fit the method (called by ``Recipe`` after
        the checks every recipe shares)."""
        if recipe.optimizer == "tile" and not self.tiles_optimizer:
            raise ValueError(
                "optimizer=tile copies the dense moments into experts that equal the dense MLP, "
                f"so it needs method=copy (got {recipe.method!r}); use optimizer=reset"
            )

    def total_experts(self, recipe: Recipe) -> int:
        """E, the experts per MoE layer."""
        return recipe.num_experts

    def granularity(self, recipe: Recipe) -> int:
        """G: each expert is f/G wide (f: the dense MLP's width)."""
        return 1

    def display_name(self, recipe: Recipe) -> str:
        """The recipe's short name (``recipe_name`` in recipe.json)."""
        return self.name

    def experts(
        self, mlp: Mapping[str, np.ndarray], names: MlpNames, recipe: Recipe, layer: int
    ) -> dict[str, np.ndarray]:
        """The stacked experts ``{name: [E, ...]}`` of one dense MLP; ``layer`` is the MoE
        layer's stable index (``rules._layer_index``), for per-layer randomness."""
        raise NotImplementedError

    def router(
        self, shape: tuple[int, ...], layer: int, recipe: Recipe, rng: np.random.Generator
    ) -> np.ndarray:
        """The router kernel [d, E] of MoE layer ``layer``, drawn from ``rng`` (the caller
        seeds it from the recipe's seed and the layer)."""
        d, e = shape
        return rng.normal(0.0, recipe.router_init_std, (d, e)).astype(np.float32)

    def preserves_dense_function(self, recipe: Recipe) -> str | None:
        """None when the experts are meant to sum to the dense MLP (given routing weights that
        sum to one), else why not."""
        return f"method {recipe.method!r} changes the experts' weights"

    def check_model(self, recipe: Recipe, moe_blocks: Mapping[str, MoeConfig]) -> None:
        """Raise ValueError if the MoE model's routing (its ``MoeConfig`` blocks by name)
        does not fit the method."""


class Copy(Method):
    """Komatsuzaki et al. 2023: every expert a copy of the dense MLP (``copy_experts``)."""

    name = "copy"
    settings = ("num_experts", "noise_std")
    tiles_optimizer = True

    def experts(self, mlp, names, recipe, layer):
        return copy_experts(
            mlp,
            recipe.num_experts,
            names,
            noise_std=recipe.noise_std,
            seed=recipe.seed,
            layer=layer,
        )

    def preserves_dense_function(self, recipe):
        if recipe.noise_std == 0.0:
            return None
        return f"copy with noise_std={recipe.noise_std:g} perturbs the experts"


class VirtualGroup(Method):
    """He et al. 2024: E_x·G experts of width f/G in virtual groups (``virtual_group_experts``,
    ``virtual_group_router``)."""

    name = "virtual_group"
    settings = ("expansion", "granularity", "k", "ordering", "scaling")

    def validate(self, recipe):
        super().validate(recipe)
        if recipe.k % recipe.granularity:
            raise ValueError(
                f"virtual groups need K % G == 0; got K={recipe.k}, G={recipe.granularity}"
            )
        if recipe.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {recipe.ordering!r}")
        if recipe.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {recipe.scaling!r}")

    def total_experts(self, recipe):
        return recipe.expansion * recipe.granularity

    def granularity(self, recipe):
        return recipe.granularity

    def display_name(self, recipe):
        return recipe_name(recipe.expansion, recipe.granularity, recipe.k)

    def experts(self, mlp, names, recipe, layer):
        return virtual_group_experts(
            mlp,
            recipe.expansion,
            recipe.granularity,
            recipe.k,
            names,
            ordering=recipe.ordering,
            scaling=recipe.scaling,
        )

    def router(self, shape, layer, recipe, rng):
        d, _ = shape
        base = rng.normal(0.0, recipe.router_init_std, (d, recipe.expansion))
        return virtual_group_router(base, recipe.granularity).astype(np.float32)

    def preserves_dense_function(self, recipe):
        if recipe.scaling == "exact" and recipe.ordering == "topk_then_softmax":
            return None
        return (
            f"virtual_group with scaling={recipe.scaling!r}, ordering={recipe.ordering!r} "
            "(only scaling='exact' with topk_then_softmax sums to the dense MLP)"
        )

    def check_model(self, recipe, moe_blocks):
        for block in moe_blocks.values():
            if block.sparse_layers(1_000_000) and (
                block.router != "top_k" or block.k != recipe.k or block.ordering != recipe.ordering
            ):
                raise ValueError(
                    f"virtual_group scaling assumes top-{recipe.k} {recipe.ordering} routing; the "
                    f"model routes {block.router} k={block.k} {block.ordering}: set model.moe "
                    "(router, k, ordering) to match upcycle (k, ordering)"
                )


class Drop(Method):
    """Nakamura et al. 2025: copies with a random share of hidden units re-initialised
    (``drop_upcycle_experts``)."""

    name = "drop"
    settings = ("num_experts", "drop_ratio", "drop_stats")

    def validate(self, recipe):
        super().validate(recipe)
        if not 0.0 <= recipe.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio r must be in [0, 1], got {recipe.drop_ratio}")
        if recipe.drop_stats not in DROP_STATS:
            raise ValueError(f"stats must be one of {DROP_STATS}, got {recipe.drop_stats!r}")

    def experts(self, mlp, names, recipe, layer):
        return drop_upcycle_experts(
            mlp,
            recipe.num_experts,
            recipe.drop_ratio,
            names,
            seed=recipe.seed,
            layer=layer,
            stats=recipe.drop_stats,
        )


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to ``METHODS`` under ``method.name`` (refusing a name already taken)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    if method.name in METHODS:
        raise ValueError(f"an upcycling method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove the method ``name`` from ``METHODS`` (tests that register their own)."""
    get(name)
    del METHODS[name]


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(METHODS)


def get(name: str) -> Method:
    """The registered method ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"upcycling method must be one of {names()}, got {name!r}") from None


for _method in (Copy(), VirtualGroup(), Drop()):
    register(_method)
