"""Upcycling methods as data: a ``Method`` subclass per method (``Copy``, ``VirtualGroup``,
``Drop``, ``FineGrainedShared``) in the registry ``METHODS``, owning the recipe settings it
reads, their validation, the expert count, expert and router construction (the numerics live
in ``experts.py``, whose docstring has each method's formulas and sources), the model routing
it needs and whether it is meant to keep the dense function. ``rules.py`` and ``Recipe`` only
ask ``get(recipe.method)``; a new method is one subclass and one ``register`` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from sparse_upcycle.routing import ORDERINGS
from sparse_upcycle.upcycle.experts import (
    BIG_VISION,
    DROP_STATS,
    DROP_UNITS,
    SCALINGS,
    T5X_GATED,
    T5X_PLAIN,
    MlpNames,
    copy_experts,
    drop_upcycle_experts,
    fine_grained_shared_experts,
    fine_grained_shared_name,
    fine_grained_shared_scale,
    recipe_name,
    reinitialise_units,
    virtual_group_experts,
    virtual_group_router,
    virtual_group_scale,
)

if TYPE_CHECKING:
    from sparse_upcycle.models.moe_config import MoeConfig
    from sparse_upcycle.upcycle.recipe import Recipe

__all__ = [
    "BIG_VISION",
    "DROP_STATS",
    "DROP_UNITS",
    "METHODS",
    "SCALINGS",
    "T5X_GATED",
    "T5X_PLAIN",
    "Copy",
    "Drop",
    "FineGrainedShared",
    "Method",
    "MlpNames",
    "VirtualGroup",
    "copy_experts",
    "drop_upcycle_experts",
    "fine_grained_shared_experts",
    "fine_grained_shared_name",
    "fine_grained_shared_scale",
    "get",
    "names",
    "recipe_name",
    "register",
    "reinitialise_units",
    "unregister",
    "virtual_group_experts",
    "virtual_group_router",
    "virtual_group_scale",
]

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

    def shared_experts(self, recipe: Recipe) -> int:
        """S, the shared experts per MoE layer the method builds (each f/G wide)."""
        return 0

    def shared(
        self,
        mlp: Mapping[str, np.ndarray],
        names: MlpNames,
        recipe: Recipe,
        layer: int,
        gated: bool,
    ) -> dict[str, np.ndarray]:
        """The shared experts ``{name: 2-D array}`` of one dense MLP (``gated``: the layer has
        a shared-expert gate, which the rules initialise to zero)."""
        raise ValueError(
            f"method {recipe.method!r} builds no shared experts; use method "
            "'fine_grained_shared' or set model.moe.num_shared_experts=0"
        )


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
            view=True,  # read-only stacks; the writers copy
        )

    def shared_experts(self, recipe):
        return 1 if recipe.shared_source >= 0 else 0

    def shared(self, mlp, names, recipe, layer, gated):
        if recipe.shared_source < 0:
            return super().shared(mlp, names, recipe, layer, gated)
        return {name: np.asarray(mlp[name]) for name in names.all()}  # the source's MLP as is

    def preserves_dense_function(self, recipe):
        reasons = []
        if recipe.noise_std:
            reasons.append(f"copy with noise_std={recipe.noise_std:g} perturbs the experts")
        if recipe.shared_source >= 0:
            reasons.append(
                f"a shared expert (a copy of source {recipe.shared_source}'s MLP) is added to "
                "the routed experts, behind a gate sigmoid(x·g) that is not 0"
            )
        return "; ".join(reasons) or None


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
    settings = ("num_experts", "drop_ratio", "drop_stats", "drop_units")

    def validate(self, recipe):
        super().validate(recipe)
        if not 0.0 <= recipe.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio r must be in [0, 1], got {recipe.drop_ratio}")
        _check_drop_draws(recipe)

    def experts(self, mlp, names, recipe, layer):
        return drop_upcycle_experts(
            mlp,
            recipe.num_experts,
            recipe.drop_ratio,
            names,
            seed=recipe.seed,
            layer=layer,
            stats=recipe.drop_stats,
            units=recipe.drop_units,
        )


def _check_drop_draws(recipe) -> None:
    if recipe.drop_stats not in DROP_STATS:
        raise ValueError(f"stats must be one of {DROP_STATS}, got {recipe.drop_stats!r}")
    if recipe.drop_units not in DROP_UNITS:
        raise ValueError(
            f"upcycle.drop_units must be one of {DROP_UNITS}, got {recipe.drop_units!r}"
        )


class FineGrainedShared(Method):
    """Fine-grained routed experts plus shared experts from one dense MLP
    (``fine_grained_shared_experts``; the router in runs of G-S equal columns)."""

    name = "fine_grained_shared"
    settings = (
        "num_experts",
        "shared_experts",
        "granularity",
        "k",
        "ordering",
        "renormalize",
        "scaling",
        "reinit_ratio",
        "drop_stats",
        "drop_units",
    )

    def validate(self, recipe):
        super().validate(recipe)
        g, s, e, k = recipe.granularity, recipe.shared_experts, recipe.num_experts, recipe.k
        if not 0 <= s < g:
            raise ValueError(
                f"fine_grained_shared needs 0 <= shared_experts < granularity; got S={s}, G={g}"
            )
        r = g - s
        if e % r or k % r:
            raise ValueError(
                f"fine_grained_shared needs num_experts and k to be multiples of "
                f"granularity - shared_experts = {r}, so that top-K picks whole replicas of the "
                f"routed shards; got num_experts={e}, k={k}"
            )
        if k > e:
            raise ValueError(f"k={k} must be <= num_experts={e}")
        if recipe.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {recipe.ordering!r}")
        if recipe.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {recipe.scaling!r}")
        if not 0.0 <= recipe.reinit_ratio <= 1.0:
            raise ValueError(f"reinit_ratio must be in [0, 1], got {recipe.reinit_ratio}")
        _check_drop_draws(recipe)

    def granularity(self, recipe):
        return recipe.granularity

    def shared_experts(self, recipe):
        return recipe.shared_experts

    def display_name(self, recipe):
        return fine_grained_shared_name(
            recipe.num_experts, recipe.shared_experts, recipe.granularity, recipe.k
        )

    def _build(self, mlp, names, recipe, layer, gated):
        routed, shared = fine_grained_shared_experts(
            mlp,
            recipe.num_experts,
            recipe.shared_experts,
            recipe.granularity,
            recipe.k,
            names,
            ordering=recipe.ordering,
            renormalize=recipe.renormalize,
            scaling=recipe.scaling,
            gated_shared=gated,
        )
        if recipe.reinit_ratio:
            reinitialise_units(
                routed,
                mlp,
                recipe.reinit_ratio,
                names,
                seed=recipe.seed,
                layer=layer,
                stats=recipe.drop_stats,
                units=recipe.drop_units,
            )
        return routed, shared

    def experts(self, mlp, names, recipe, layer):
        return self._build(mlp, names, recipe, layer, False)[0]

    def shared(self, mlp, names, recipe, layer, gated):
        if not recipe.shared_experts:
            return super().shared(mlp, names, recipe, layer, gated)
        return self._build(mlp, names, recipe, layer, gated)[1]

    def router(self, shape, layer, recipe, rng):
        d, _ = shape
        r = recipe.granularity - recipe.shared_experts
        base = rng.normal(0.0, recipe.router_init_std, (d, recipe.num_experts // r))
        return virtual_group_router(base, r).astype(np.float32)

    def preserves_dense_function(self, recipe):
        reasons = []
        if recipe.scaling != "exact":
            reasons.append(f"scaling={recipe.scaling!r} (only 'exact' is exact for any activation)")
        if recipe.reinit_ratio:
            reasons.append(f"reinit_ratio={recipe.reinit_ratio:g} re-initialises routed units")
        sums_to_one = recipe.ordering == "topk_then_softmax" or recipe.renormalize
        if not sums_to_one and recipe.router_init_std:
            reasons.append(
                "softmax_then_topk without renormalize weights the routed experts by the "
                "router's probabilities, so the MoE equals the dense MLP only at a uniform "
                "router (router_init_std=0)"
            )
        if not reasons:
            return None
        return "fine_grained_shared with " + "; ".join(reasons)

    def check_model(self, recipe, moe_blocks):
        for block in moe_blocks.values():
            if not block.sparse_layers(1_000_000):
                continue
            if (
                block.router != "top_k"
                or block.k != recipe.k
                or block.ordering != recipe.ordering
                or block.renormalize != recipe.renormalize
            ):
                raise ValueError(
                    f"fine_grained_shared scaling assumes top-{recipe.k} {recipe.ordering} "
                    f"routing with renormalize={recipe.renormalize}; the model routes "
                    f"{block.router} k={block.k} {block.ordering} renormalize={block.renormalize}"
                    ": set model.moe (router, k, ordering, renormalize) to match upcycle"
                )
            if block.score_function != "softmax" and not recipe.renormalize:
                raise ValueError(
                    f"fine_grained_shared with {block.score_function} scores keeps the dense "
                    "function only when the top-K weights sum to one: set renormalize=True in "
                    "model.moe and upcycle"
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


for _method in (Copy(), VirtualGroup(), Drop(), FineGrainedShared()):
    register(_method)
