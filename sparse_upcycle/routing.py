"""Routers: who goes to which expert, with what weight, and what it cost.

Axis letters (vmoe): G groups, S tokens per group, E experts, C capacity (slots per expert),
K experts per token, d model width.

A router takes float32 logits ``[G, S, E]`` (``router_logits`` computes them from tokens) and an
optional ``token_mask [G, S]`` (True = real token, False = padding) and returns a *decision*. The
layer (``moe.py``) moves the data; routers never touch token vectors.

Capacity formulas (the only place they are written down; ``inspect`` prints them):

* expert choice:  ``capacity = ceil(C * S / E)``
* top-K:          ``capacity = ceil(C * S * K / E)``; ``capacity_factor=None`` means dropless
* then rounded up to a multiple of ``capacity_multiple`` and clipped to ``S`` (an expert never
  holds more tokens than a group has; a token never picks the same expert twice). The clip
  wins over the multiple: for S=6 and multiple 4, a raw capacity of 5 becomes 6.

Ties are broken towards the lower index everywhere (lower expert id when a token picks experts,
lower token position when an expert picks tokens or when priorities are equal).

Decisions come in two forms:

* ``SlotDecision`` (capacity-limited routers): expert-major buffers ``token_index [G, E, C]``,
  ``combine_weight [G, E, C]`` and ``slot_valid [G, E, C]``. Slot ``(g, e, c)`` holds token
  ``token_index[g, e, c]`` of group ``g`` when valid.
* ``DroplessDecision`` (top-K without capacity): token-major ``expert_index [G, S, K]`` and
  ``combine_weight [G, S, K]``; padding tokens carry the out-of-range expert id ``E``.

``dense_combine_weights(decision) -> float32 [G, S, E]`` shows either form the same way.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from sparse_upcycle import sharding
from sparse_upcycle.balancing import selection_bias_update as selection_bias_update
from sparse_upcycle.balancing import sequence_load_balancing_loss

GROUP_SCORES = ("batch", None, None)  # [G, S, E] or [G, E, S] scores, split as the tokens are

ORDERINGS = ("softmax_then_topk", "topk_then_softmax")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss")


# --------------------------------------------------------------------------------------------
# Capacity.
# --------------------------------------------------------------------------------------------


def routing_groups(num_tokens: int, group_size: int, multiple: int = 1) -> tuple[int, int]:
    """``(G, S)``: the number of routing groups and the tokens per group for ``num_tokens``.

    ``multiple == 1``: ``S = min(group_size, T)``, ``G = ceil(T / S)`` (the last group padded).
    ``multiple = m > 1``: the smallest ``G >= max(ceil(T / group_size), m)`` that is a multiple
    of ``m`` and divides ``T``, with ``S = T / G`` (no padding; groups no larger than
    ``group_size``). This is ``_num_groups`` of flaxformer's ``moe_layers.py`` (the T5X MoE code
    of Komatsuzaki et al.), whose ``m`` is E × the expert replicas, except that it starts from
    ``floor(T / group_size)``, which can leave groups larger than ``group_size``. Where no such
    ``G`` exists (``m`` does not divide ``T``) the default rule applies.
    """
    t = int(num_tokens)
    if multiple > 1 and t % multiple == 0:
        g = max(-(-t // group_size), multiple)
        g = -(-g // multiple) * multiple
        while t % g:
            g += multiple
        return g, t // g
    s = min(group_size, t)
    return -(-t // s), s


def _round_capacity(raw: float, multiple: int, group_size: int) -> int:
    cap = math.ceil(raw - 1e-9)  # guard against 2.0000000001 from float products
    if multiple > 1:
        cap = -(-cap // multiple) * multiple
    return max(1, min(cap, group_size))


def expert_choice_capacity(
    group_size: int, num_experts: int, capacity_factor: float, multiple: int = 1
) -> int:
    """Slots per expert for expert choice: ceil(C·S/E), rounded up to ``multiple``, ≤ S."""
    return _round_capacity(capacity_factor * group_size / num_experts, multiple, group_size)


def _group_local_top_k(x_GSE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` over experts, run on each device's own routing groups when a mesh is
    set. The partitioner cannot split the top-k op itself: it gathers the [G, S, E] scores
    onto every device (and again for the gradient); top-k of a token needs only that token."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.lax.top_k(x_GSE, k)
    spec = sharding.logical_to_spec(GROUP_SCORES, x_GSE.shape, mesh)
    if spec[0] is None:  # groups not split (too few, or the axes are manual here)
        return jax.lax.top_k(x_GSE, k)
    values, index = jax.shard_map(
        lambda x: tuple(jax.lax.top_k(x, k)), in_specs=spec, out_specs=(spec, spec)
    )(x_GSE)
    return values, index


def top_k_capacity(
    group_size: int, num_experts: int, k: int, capacity_factor: float | None, multiple: int = 1
) -> int | None:
    """Slots per expert for top-K: ceil(C·S·K/E), rounded up to ``multiple``, ≤ S.

    None when ``capacity_factor`` is None (dropless).
    """
    if capacity_factor is None:
        return None
    return _round_capacity(capacity_factor * group_size * k / num_experts, multiple, group_size)


# --------------------------------------------------------------------------------------------
# Decisions and metrics.
# --------------------------------------------------------------------------------------------


@struct.dataclass
class RouterMetrics:
    """Losses and diagnostics of one routing decision, over real tokens only.

    Token statistics (z-loss, entropy, top-1) are means over all real tokens of the call; counts
    (load, drops) are pooled over groups; the load-balancing loss is computed per group and
    averaged with each group weighted by its number of real tokens. So padding never counts,
    and a partly padded last group weighs what its real tokens weigh.

    Attributes:
      load_balancing_loss: ``load_balancing_type="aux_loss"``: the Switch loss E·Σ_e f_e·P_e
        (Fedus et al. 2021, eq. 4), per group; f_e counts tokens with e among their top-K, so
        Σ_e f_e = K and a perfectly balanced router scores K (as flaxformer/T5X).
        ``"seq_aux_loss"``: DeepSeek-V3's sequence-wise loss (DeepSeek-AI 2024, §2.3, eqs.
        17-20), per sequence Σ_e f_e·P_e with f_e = E/(K·T)·(tokens of the sequence with e
        among their top-K), P_e the sequence's mean normalised score, so a balanced router
        scores 1; averaged over sequences. P uses the probabilities below. Zero for expert
        choice, which is balanced by construction.
      z_loss: router z-loss mean(logsumexp(logits)²) (Zoph et al. 2022, ST-MoE eq. 5).
      expert_load: [E] fraction of kept assignments handled by each expert (sums to 1).
      dropped_fraction: top-K: fraction of assignments dropped by capacity; expert choice:
        fraction of tokens reached by no expert.
      entropy: mean entropy of the probabilities over experts (the softmax, or with sigmoid
        scores the scores divided by their sum).
      top1_prob: mean of the largest probability.
    """

    load_balancing_loss: jax.Array
    z_loss: jax.Array
    expert_load: jax.Array
    dropped_fraction: jax.Array
    entropy: jax.Array
    top1_prob: jax.Array


@struct.dataclass
class SlotDecision:
    """Capacity-limited decision: expert ``e``'s slot ``c`` in group ``g`` holds one token."""

    token_index: jax.Array  # int32 [G, E, C]; 0 in empty slots
    combine_weight: jax.Array  # float32 [G, E, C]; 0 in empty slots
    slot_valid: jax.Array  # bool [G, E, C]
    metrics: RouterMetrics
    group_size: int = struct.field(pytree_node=False)


@struct.dataclass
class DroplessDecision:
    """Dropless top-K decision: token ``s`` goes to experts ``expert_index[g, s, :]``."""

    expert_index: jax.Array  # int32 [G, S, K]; E (out of range) for padding tokens
    combine_weight: jax.Array  # float32 [G, S, K]; 0 for padding tokens
    metrics: RouterMetrics
    num_experts: int = struct.field(pytree_node=False)


RoutingDecision = SlotDecision | DroplessDecision


def dense_combine_weights(decision: RoutingDecision) -> jax.Array:
    """float32 [G, S, E]: the weight token s receives from expert e (0 where not routed)."""
    if isinstance(decision, DroplessDecision):
        onehot = jax.nn.one_hot(decision.expert_index, decision.num_experts, dtype=jnp.float32)
        return jnp.einsum("gske,gsk->gse", onehot, decision.combine_weight)
    g, e, c = decision.token_index.shape
    weight = jnp.where(decision.slot_valid, decision.combine_weight, 0.0).astype(jnp.float32)
    expert_ids = jnp.broadcast_to(jnp.arange(e)[:, None], (e, c))

    def one_group(tok_EC, w_EC):
        out = jnp.zeros((decision.group_size, e), jnp.float32)
        return out.at[tok_EC.reshape(-1), expert_ids.reshape(-1)].add(w_EC.reshape(-1))

    return jax.vmap(one_group)(decision.token_index, weight)


# --------------------------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------------------------


def router_logits(
    x_GSd: jax.Array,
    kernel_dE: jax.Array,
    *,
    jitter_eps: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """float32 logits x @ w. With ``rng`` and ``jitter_eps > 0`` the router's copy of the input
    is multiplied by U(1-eps, 1+eps) noise first (Switch Transformer, Fedus et al. 2021, §2.4);
    the experts still see the clean tokens. Pass ``rng`` only in training."""
    x = x_GSd.astype(jnp.float32)
    if rng is not None and jitter_eps > 0.0:
        x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - jitter_eps, 1.0 + jitter_eps)
    return jnp.einsum(
        "gsd,de->gse", x, kernel_dE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def _token_mean(values_GS: jax.Array, mask_GS: jax.Array) -> jax.Array:
    """Mean over the real tokens of all groups."""
    return jnp.where(mask_GS, values_GS, 0.0).sum() / jnp.maximum(mask_GS.sum(), 1)


def _token_stats(logits_GSE, probs_GSE, mask_GS):
    z = jax.nn.logsumexp(logits_GSE, axis=-1)
    entropy = -jnp.sum(probs_GSE * jnp.log(jnp.clip(probs_GSE, 1e-30)), axis=-1)
    return (
        _token_mean(z**2, mask_GS),
        _token_mean(entropy, mask_GS),
        _token_mean(probs_GSE.max(axis=-1), mask_GS),
    )


def _expert_load(kept_per_expert_GE: jax.Array) -> jax.Array:
    kept_E = kept_per_expert_GE.sum(axis=0)
    return kept_E / jnp.maximum(kept_E.sum(), 1)


def _prepare(logits_GSE, token_mask):
    if logits_GSE.ndim != 3:
        raise ValueError(f"router logits must be [G, S, E], got shape {logits_GSE.shape}")
    logits = logits_GSE.astype(jnp.float32)
    if token_mask is None:
        token_mask = jnp.ones(logits.shape[:2], bool)
    return logits, token_mask.astype(bool), jax.nn.softmax(logits, axis=-1)


# --------------------------------------------------------------------------------------------
# Expert choice.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouter:
    """Expert choice (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", §3.1).

    Per group: probs = softmax over experts; each expert takes the ``capacity`` real tokens with
    the highest prob for it; the combine weight is that prob. A token may reach 0..E experts.
    With ``normalize_combine_weights`` each token's weights are divided by their sum (the
    Sparse Upcycling paper's vision setting); unreached tokens keep zero weight.
    """

    num_experts: int
    capacity_factor: float = 2.0
    capacity_multiple: int = 1
    normalize_combine_weights: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.capacity_factor or self.capacity_factor <= 0:
            raise ValueError(f"expert choice needs capacity_factor > 0, got {self.capacity_factor}")
        if self.capacity_multiple < 1:
            raise ValueError(f"capacity_multiple must be >= 1, got {self.capacity_multiple}")

    def capacity(self, group_size: int) -> int:
        return expert_choice_capacity(
            group_size, self.num_experts, self.capacity_factor, self.capacity_multiple
        )

    def route(self, logits_GSE: jax.Array, token_mask: jax.Array | None = None) -> SlotDecision:
        logits, mask, probs = _prepare(logits_GSE, token_mask)
        g, s, e = probs.shape
        if e != self.num_experts:
            raise ValueError(f"logits have {e} experts, router expects {self.num_experts}")
        cap = self.capacity(s)
        # Padding scores -1 < any probability, so it is picked only when real tokens run out,
        # and such slots are marked invalid.
        scores_GES = jnp.where(mask[..., None], probs, -1.0).transpose(0, 2, 1)
        top_p, token_index = _group_local_top_k(scores_GES, cap)  # [G, E, C]
        valid = top_p >= 0.0
        weight = jnp.where(valid, top_p, 0.0)

        reached_GS = jax.vmap(
            lambda t, v: (
                jnp.zeros(s, jnp.float32).at[t.reshape(-1)].add(v.reshape(-1).astype(jnp.float32))
            )
        )(token_index, valid)
        if self.normalize_combine_weights:
            denom_GS = jax.vmap(
                lambda t, w: jnp.zeros(s, jnp.float32).at[t.reshape(-1)].add(w.reshape(-1))
            )(token_index, weight)
            denom = jnp.take_along_axis(denom_GS[:, None, :], token_index, axis=2)
            weight = jnp.where(valid, weight / jnp.maximum(denom, 1e-30), 0.0)

        z_loss, entropy, top1 = _token_stats(logits, probs, mask)
        unreached = jnp.where(mask, reached_GS == 0, False).sum(axis=1)
        metrics = RouterMetrics(
            load_balancing_loss=jnp.zeros((), jnp.float32),
            z_loss=z_loss,
            expert_load=_expert_load(valid.sum(axis=-1).astype(jnp.float32)),
            dropped_fraction=unreached.sum() / jnp.maximum(mask.sum(), 1),
            entropy=entropy,
            top1_prob=top1,
        )
        return SlotDecision(token_index.astype(jnp.int32), weight, valid, metrics, s)


# --------------------------------------------------------------------------------------------
# Top-K token choice.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopKRouter:
    """Top-K token choice (Shazeer et al. 2017; GShard; Switch for K=1).

    * ``ordering="softmax_then_topk"``: softmax over all E, keep the K largest probabilities
      (He et al. 2024 found this better for upcycling). ``"topk_then_softmax"``: softmax over
      the K largest logits only (Mixtral).
    * ``score_function="sigmoid"`` (DeepSeek-V3, DeepSeek-AI 2024, §2.1 eqs. 13-15): each
      expert's score is s_e = sigmoid(logit_e), the K largest scores are kept and their
      weights are the scores (with ``renormalize``, s_e / Σ_top-K s, as DeepSeek-V3 does). It
      has no ordering choice: ``ordering`` must stay ``"softmax_then_topk"`` ("scores, then
      top-K").
    * ``selection_bias`` [E] passed to ``route`` (auxiliary-loss-free balancing, Wang et al.
      2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", §3): top-K
      picks by score + bias, the weights are the unbiased scores (for ``topk_then_softmax``
      the softmax of the chosen experts' unbiased logits). The score a bias is added to is
      the one top-K ranks: the probability, the logit (``topk_then_softmax``) or the sigmoid
      score. No gradient reaches the bias; ``selection_bias_update`` moves it between steps.
    * ``renormalize``: divide the K weights by their sum.
    * capacity ``ceil(C·S·K/E)``; ``capacity_factor=None`` is dropless.
    * Buffers fill in priority order: k-major (every token's 1st choice before any token's
      2nd), then by position; ``batch_prioritized`` (BPR, Riquelme et al. 2021, §3.2) orders
      tokens within each k by top-1 probability (max of the softmax over all E, whatever the
      ordering) instead. BPR looks at later tokens' scores, so
      it is refused for causal decoders (``causal=True``).
    * A dropped assignment contributes nothing: the residual connection carries the token.
    """

    num_experts: int
    k: int = 2
    capacity_factor: float | None = 1.25
    capacity_multiple: int = 1
    ordering: str = "softmax_then_topk"
    renormalize: bool = False
    batch_prioritized: bool = False
    causal: bool = False
    score_function: str = "softmax"
    load_balancing_type: str = "aux_loss"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}"
            )
        if self.score_function == "sigmoid" and self.ordering != "softmax_then_topk":
            raise ValueError(
                "sigmoid scores are per expert, so there is no softmax to order against top-K: "
                f"set ordering='softmax_then_topk' (scores, then top-K), got {self.ordering!r}"
            )
        if self.load_balancing_type not in LOAD_BALANCING_TYPES:
            raise ValueError(
                f"load_balancing_type must be one of {LOAD_BALANCING_TYPES}, got "
                f"{self.load_balancing_type!r}"
            )
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(
                f"top-K needs 1 <= k <= num_experts, got k={self.k}, num_experts={self.num_experts}"
            )
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {ORDERINGS}, got {self.ordering!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}"
            )
        if self.capacity_multiple < 1:
            raise ValueError(f"capacity_multiple must be >= 1, got {self.capacity_multiple}")
        if self.batch_prioritized and self.causal:
            raise ValueError(
                "batch_prioritized routing ranks tokens by their top-1 probability across the "
                "whole group, which lets a token's routing depend on later tokens: it is for "
                "encoders only; set batch_prioritized=False for a causal decoder"
            )
        if self.batch_prioritized and self.capacity_factor is None:
            raise ValueError("batch_prioritized only matters with a capacity; dropless has none")

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def capacity(self, group_size: int) -> int | None:
        return top_k_capacity(
            group_size, self.num_experts, self.k, self.capacity_factor, self.capacity_multiple
        )

    def route(
        self,
        logits_GSE: jax.Array,
        token_mask: jax.Array | None = None,
        *,
        selection_bias: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        num_segments: int | None = None,
    ) -> SlotDecision | DroplessDecision:
        """The decision for ``logits_GSE``. ``selection_bias`` [E]: added to the scores top-K
        ranks (class docstring). ``segment_ids`` [G, S] (int, in ``[0, num_segments)``): the
        sequence of each token, needed by ``load_balancing_type="seq_aux_loss"``."""
        logits, mask, probs = _prepare(logits_GSE, token_mask)
        g, s, e = probs.shape
        k = self.k
        if e != self.num_experts:
            raise ValueError(f"logits have {e} experts, router expects {self.num_experts}")
        if self.score_function == "sigmoid":
            scores = jax.nn.sigmoid(logits)
            # Probabilities for the balancing loss and the diagnostics (DeepSeek-V3 eq. 19).
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        else:
            scores = probs if self.ordering == "softmax_then_topk" else logits
        if selection_bias is None:
            ranked = scores
        else:
            ranked = scores + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
        _, expert_GSK = _group_local_top_k(ranked, k)
        weight_GSK = jnp.take_along_axis(scores, expert_GSK, axis=-1)
        if self.score_function == "softmax" and self.ordering == "topk_then_softmax":
            weight_GSK = jax.nn.softmax(weight_GSK, axis=-1)
        if self.renormalize:
            weight_GSK = weight_GSK / jnp.sum(weight_GSK, axis=-1, keepdims=True)
        weight_GSK = jnp.where(mask[..., None], weight_GSK, 0.0)

        # The load-balancing loss on choices before capacity.
        chose_GSE = jax.nn.one_hot(expert_GSK, e, dtype=jnp.float32).max(axis=2)
        if self.load_balancing_type == "seq_aux_loss":
            if segment_ids is None or num_segments is None:
                raise ValueError("seq_aux_loss needs the tokens' segment_ids and num_segments")
            lb_loss = sequence_load_balancing_loss(
                chose_GSE, probs, mask, segment_ids, num_segments, k
            )
        else:
            n_real = jnp.maximum(mask.sum(axis=1), 1)[:, None]
            f_GE = jnp.where(mask[..., None], chose_GSE, 0.0).sum(axis=1) / n_real
            p_GE = jnp.where(mask[..., None], probs, 0.0).sum(axis=1) / n_real
            n_G = mask.sum(axis=1)
            lb_loss = jnp.sum(n_G * e * jnp.sum(f_GE * p_GE, axis=-1)) / jnp.maximum(n_G.sum(), 1)
        z_loss, entropy, top1 = _token_stats(logits, probs, mask)

        cap = self.capacity(s)
        if cap is None:  # dropless (capacity_factor None): every choice is kept
            expert_GSK = jnp.where(mask[..., None], expert_GSK, e).astype(jnp.int32)
            kept_GE = jnp.where(mask[..., None], chose_GSE, 0.0).sum(axis=1)
            metrics = RouterMetrics(
                lb_loss, z_loss, _expert_load(kept_GE), jnp.zeros((), jnp.float32), entropy, top1
            )
            return DroplessDecision(expert_GSK, weight_GSK, metrics, e)

        if self.batch_prioritized:
            # Real tokens by descending top-1 prob (stable: ties keep position order), padding last.
            priority = jnp.where(mask, probs.max(axis=-1), -1.0)
            order_GS = jnp.argsort(-priority, axis=1, stable=True)
        else:
            order_GS = jnp.broadcast_to(jnp.arange(s), (g, s))
        # Assignments in priority order, k-major: [G, K, S] -> [G, K*S].
        expert_ordered = jnp.take_along_axis(expert_GSK, order_GS[..., None], axis=1)
        real_ordered = jnp.take_along_axis(mask, order_GS, axis=1)
        onehot = jax.nn.one_hot(
            expert_ordered.transpose(0, 2, 1).reshape(g, k * s), e, dtype=jnp.int32
        )
        onehot = onehot * jnp.tile(real_ordered, (1, k))[..., None]
        position = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # [G, K*S]
        position = position.reshape(g, k, s).transpose(0, 2, 1)  # [G, S(ordered), K]
        inverse = jnp.argsort(order_GS, axis=1)
        position_GSK = jnp.take_along_axis(position, inverse[..., None], axis=1)
        kept_GSK = mask[..., None] & (position_GSK < cap)

        # Scatter kept assignments into expert-major slots; dropped ones index slot `cap`,
        # which mode="drop" discards.
        slot = jnp.where(kept_GSK, position_GSK, cap)
        tokens = jnp.broadcast_to(jnp.arange(s)[:, None], (s, k))

        def fill(e_SK, c_SK, w_SK, keep_SK):
            shape = (e, cap)
            idx = (e_SK.reshape(-1), c_SK.reshape(-1))
            tok = jnp.zeros(shape, jnp.int32).at[idx].set(tokens.reshape(-1), mode="drop")
            wgt = jnp.zeros(shape, jnp.float32).at[idx].set(w_SK.reshape(-1), mode="drop")
            val = jnp.zeros(shape, bool).at[idx].set(keep_SK.reshape(-1), mode="drop")
            return tok, wgt, val

        token_index, weight, valid = jax.vmap(fill)(expert_GSK, slot, weight_GSK, kept_GSK)
        kept_GE = valid.sum(axis=-1).astype(jnp.float32)
        n_assign = mask.sum(axis=1) * k
        dropped = (n_assign.sum() - kept_GE.sum()) / jnp.maximum(n_assign.sum(), 1)
        metrics = RouterMetrics(lb_loss, z_loss, _expert_load(kept_GE), dropped, entropy, top1)
        return SlotDecision(token_index, weight, valid, metrics, s)


Router = ExpertChoiceRouter | TopKRouter
