"""How each upcycling method builds experts: one dense MLP (numpy arrays) -> E stacked experts,
deterministically (``methods.py`` wraps each in a registered ``Method``).

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
  set of ⌊r·f⌋ hidden units (one set shared by the input columns and output rows, as the
  paper's method section describes it: ``units="shared"``) is re-initialised from
  N(mean, std) of the original matrix; the rest is copied. The authors' released conversion
  script (github.com/Taishi-N324/Drop-Upcycling, ``conversions/drop_upcycling.py``) draws the
  indices anew for each of gate, up and down (``torch.randperm`` inside its per-matrix
  function), so a unit may be re-drawn in one matrix and kept in another: ``units=
  "per_matrix"``. (It also permutes each expert's hidden units first, which changes no
  function, and takes mean and std over the units it replaces, a random half of the matrix
  at r = 0.5, where ours takes the whole matrix.)
* ``fine_grained_shared_experts`` — fine-grained routed experts plus shared experts from one
  dense MLP, as Qwen reported for Qwen1.5-MoE-A2.7B (from Qwen-1.8B; Qwen Team 2024) in the
  shape of DeepSeek-MoE (Dai et al. 2024, §3: fine-grained segmentation + shared isolation).
  The dense hidden units are cut into G shards of f/G (as virtual groups cut them). Shards
  0..S-1 form the S shared experts (one fused MLP of width S·f/G, which every token sees);
  the R = G-S others seed the E routed experts: expert j holds shard S + (j mod R), so E/R
  replicas of the routed part sit behind a router whose columns come in runs of R equal
  ones (``virtual_group_router``). Top-K with K % R == 0 then picks whole runs, each summing
  to the routed part of the MLP, and the scale a of the routed experts makes the layer the
  dense MLP (``fine_grained_shared_scale``): when the K weights sum to one
  (``topk_then_softmax``, or ``renormalize``) the picked runs' weights sum to 1/R per expert,
  so a = R, exact for any router; with ``softmax_then_topk`` without renormalisation the
  weights are the router's probabilities and no constant is exact for every router: a =
  R·E/K is exact at a uniform router (p = 1/E; ``router_init_std=0``, which leaves the
  replicas symmetric until something else breaks the tie). A shared-expert gate (Qwen2-MoE)
  starts at zero, so sigmoid gives 1/2, and the shared output kernel is doubled. Drop-
  Upcycling's re-initialisation (``reinit_ratio``) composes with it on the routed experts.

Randomness comes from ``numpy.random.default_rng([seed, layer, expert, purpose])``, so a
recipe's seed fixes every expert of every layer, independent of processing order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sparse_upcycle.expert_mlp import EXPERT_NAMING
from sparse_upcycle.routing import ORDERINGS

SCALINGS = ("paper", "exact", "none")
DROP_STATS = ("matrix", "none")
DROP_UNITS = ("shared", "per_matrix")


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
    view: bool = False,
) -> dict[str, np.ndarray]:
    """Every expert a copy of the dense MLP (+ optional Gaussian noise on the kernels). With
    ``view`` (and no noise) the stacks are read-only ``np.broadcast_to`` views of the dense
    arrays: nothing is copied until a writer does."""
    _check(mlp, names)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    out = {}
    for i, name in enumerate(names.all()):
        w = np.asarray(mlp[name])
        if view and not noise_std:
            out[name] = np.broadcast_to(w[None], (num_experts, *w.shape))
            continue
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
    units: str = "shared",
) -> dict[str, np.ndarray]:
    """Copy, then re-initialise ⌊ratio·f⌋ hidden units per expert (Drop-Upcycling).

    ``stats="matrix"`` draws from N(mean, std) of each original matrix (the paper's choice);
    ``"none"`` from N(0, std). ``units``: one index set per expert for all its matrices
    (``"shared"``) or one per matrix (``"per_matrix"``; module docstring). Biases of dropped
    units are re-initialised to zero."""
    _check(mlp, names)
    out = copy_experts(mlp, num_experts, names)
    reinitialise_units(out, mlp, ratio, names, seed=seed, layer=layer, stats=stats, units=units)
    return out


def reinitialise_units(
    experts: dict[str, np.ndarray],
    mlp,
    ratio: float,
    names: MlpNames = T5X_GATED,
    *,
    seed: int = 0,
    layer: int = 0,
    stats: str = "matrix",
    units: str = "shared",
) -> None:
    """Drop-Upcycling's step, in place on stacked ``experts`` of width f_e: per expert, a
    random set of ⌊ratio·f_e⌋ hidden units (``units="shared"``: one set for the input columns
    and output rows; ``"per_matrix"``: a set of its own for each kernel, an input bias
    following its kernel's) is drawn from N(mean, std) of the dense matrix it came from
    (``mlp``; ``stats="none"``: N(0, std)); their input biases become zero."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop ratio r must be in [0, 1], got {ratio}")
    if stats not in DROP_STATS:
        raise ValueError(f"stats must be one of {DROP_STATS}, got {stats!r}")
    if units not in DROP_UNITS:
        raise ValueError(f"drop units must be one of {DROP_UNITS}, got {units!r}")
    num_experts, f_e = experts[names.output].shape[:2]
    n_drop = int(np.floor(ratio * f_e))
    kernels = (*names.inputs, names.output)

    def draw_units(e: int, purpose: int) -> np.ndarray:
        return np.sort(_rng(seed, layer, e, purpose).choice(f_e, size=n_drop, replace=False))

    for e in range(num_experts):
        shared = draw_units(e, 0)  # drawn in both modes: "shared" is what it always was
        chosen = {
            name: shared if units == "shared" else draw_units(e, 10 + i)
            for i, name in enumerate(kernels)
        }
        for i, name in enumerate(kernels):
            w = np.asarray(mlp[name], np.float64)
            mean = w.mean() if stats == "matrix" else 0.0
            draw = _rng(seed, layer, e, 1 + i)
            if name == names.output:
                experts[name][e, chosen[name], :] = draw.normal(mean, w.std(), (n_drop, w.shape[1]))
            else:
                experts[name][e, :, chosen[name]] = draw.normal(mean, w.std(), (n_drop, w.shape[0]))
        for bias, kernel in zip(names.input_biases, names.inputs, strict=False):
            experts[bias][e, chosen[kernel]] = 0.0


def fine_grained_shared_scale(
    num_experts: int, routed_shards: int, k: int, ordering: str, renormalize: bool
) -> float:
    """The routed experts' scale a (module docstring): R when the K weights sum to one
    (``topk_then_softmax`` or ``renormalize``), else R·E/K (exact at a uniform router)."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    if ordering == "topk_then_softmax" or renormalize:
        return float(routed_shards)
    return routed_shards * num_experts / k


def fine_grained_shared_name(num_experts: int, shared: int, granularity: int, k: int) -> str:
    """The recipe's notation, e.g. E8S2G4T2 (E routed experts, S of G shards shared, top-K)."""
    return f"E{num_experts}S{shared}G{granularity}T{k}"


def fine_grained_shared_experts(
    mlp,
    num_experts: int,
    shared: int,
    granularity: int,
    k: int,
    names: MlpNames = T5X_GATED,
    *,
    ordering: str = "topk_then_softmax",
    renormalize: bool = False,
    scaling: str = "exact",
    gated_shared: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(routed experts ``{name: [E, ...]}``, shared experts ``{name: 2-D}``) of one dense MLP
    (module docstring). ``scaling``: "exact" puts a on the routed output kernels, "paper"
    spreads it as a^(1/n) over the n matrices (exact only for homogeneous activations),
    "none" leaves it out. ``gated_shared``: the layer gates its shared experts (a zero gate
    gives 1/2, so their output kernel is doubled)."""
    d, f = _check(mlp, names)
    if names.input_biases or names.output_bias:
        raise ValueError("fine_grained_shared is defined for bias-free (LLM) MLPs")
    g, s = granularity, shared
    if not 0 <= s < g:
        raise ValueError(f"fine_grained_shared needs 0 <= S < G; got S={s}, G={g}")
    r = g - s
    if f % g:
        raise ValueError(f"the dense hidden width f={f} must be divisible by G={g}")
    if num_experts % r or k % r:
        raise ValueError(
            f"fine_grained_shared needs E and K to be multiples of G-S={r} (the routed shards "
            f"of one replica), so that top-K picks whole replicas; got E={num_experts}, K={k}"
        )
    if not 1 <= k <= num_experts:
        raise ValueError(f"K={k} must be in [1, E={num_experts}]")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    a = fine_grained_shared_scale(num_experts, r, k, ordering, renormalize)
    a = 1.0 if scaling == "none" else a
    per_matrix = a ** (1.0 / (len(names.inputs) + 1)) if scaling == "paper" else 1.0
    out_scale = a if scaling == "exact" else per_matrix
    fs = f // g
    shard = s + np.arange(num_experts) % r
    routed, shared_mlp = {}, {}
    for name in names.inputs:
        w = np.asarray(mlp[name])
        shards = w.reshape(d, g, fs).transpose(1, 0, 2)  # [G, d, f/G]
        routed[name] = (shards[shard] * per_matrix).astype(w.dtype)
        if s:
            shared_mlp[name] = np.ascontiguousarray(w[:, : s * fs])
    wo = np.asarray(mlp[names.output])
    routed[names.output] = (wo.reshape(g, fs, d)[shard] * out_scale).astype(wo.dtype)
    if s:
        shared_mlp[names.output] = (wo[: s * fs] * (2.0 if gated_shared else 1.0)).astype(wo.dtype)
    return routed, shared_mlp
