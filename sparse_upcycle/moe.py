"""Sparse MoE MLP: a router, E stacked expert MLPs, and index-based dispatch/combine.

Parameter paths (relative to the layer), mirroring T5X's dense ``MlpBlock`` with an expert axis:

* ``router/w/kernel``            [d, E]
* ``expert/wi_0/kernel``         [E, d, f]  (gated MLPs: also ``expert/wi_1/kernel``)
* ``expert/wi/kernel``           [E, d, f]  (non-gated MLPs)
* ``expert/wo/kernel``           [E, f, d]
* ``router/selection_bias``      [E]  (auxiliary-loss-free balancing only: ``expert_bias``)
* ``shared_expert/wi_0/kernel``  [d, f_s]  (shared experts only; ``wi_1``, ``wi`` likewise)
* ``shared_expert/wo/kernel``    [f_s, d]
* ``shared_expert_gate/kernel``  [d, 1]  (Qwen2-MoE's sigmoid gate only)

Shared experts (DeepSeek-MoE, Dai et al. 2024, §3.2; Qwen1.5-MoE / Qwen2-MoE) see every token:
the layer computes ``routed(x) + shared(x)``, or ``routed(x) + sigmoid(x·g)·shared(x)`` with
the gate. ``num_shared_experts`` experts of width ``shared_expert_mlp_dim`` are one MLP of width
f_s = their sum (the same function as separate experts added up), with the dense MLP's
parameter names and sharding (``embed``, ``mlp``).

Grouping (``routing.routing_groups``). Tokens ``[B, L, d]`` are flattened to ``T = B·L``
tokens and cut into ``G`` groups of ``S`` consecutive tokens. By default
``S = min(group_size, T)``; when ``S`` does not divide ``T`` the last group is filled up with
padding tokens, which are masked (never routed, never counted in losses or capacity) and cut
off again after the layer; capacity is still computed from ``S``. So a ragged tail costs at
most one partial group of compute and never changes other groups' routing. With
``group_multiple = m > 1`` the number of groups is a multiple of ``m`` instead (flaxformer's
rule), so that the groups can be split evenly over ``m`` data-parallel devices: the
``expert`` mesh axis splits groups, and a stack with fewer groups than devices is routed whole
on every device.

Data movement (DESIGN.md decision 4): a ``SlotDecision`` gathers tokens into ``[G, E, C, d]``
buffers, runs the experts as batched matmuls and scatter-adds the weighted outputs back; a
``DroplessDecision`` sorts the ``G·S·K`` assignments by expert and runs the experts as one grouped
matmul. ``dispatch`` picks how (``resolve_dispatch``):

* ``"index"``: the gathers/scatters above; dropless experts as a block-sparse grouped matmul
  (``ExpertMlp.grouped(impl="blocked")``), which is fast on CPU.
* ``"ragged"``: as ``"index"``, but dropless experts through ``jax.lax.ragged_dot`` (XLA's grouped
  kernel on TPU and GPU; XLA:CPU lowers it to a masked dense matmul, E times the FLOPs).
* ``"onehot"``: the vmoe/flaxformer-style one-hot einsum reference (O(S·E·C·d)), for tests and
  benchmarks.
* ``"auto"`` (default): ``"index"`` on CPU, ``"ragged"`` on every other platform.

Capacity routing (``SlotDecision``) runs the same gathers under ``"index"`` and ``"ragged"``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import expert_parallel, permute, routing, sharding
from sparse_upcycle.expert_mlp import ExpertMlp, RouterWeights, SharedMlp
from sparse_upcycle.layers import Kernel

DISPATCH_MODES = ("auto", "index", "ragged", "onehot")


def resolve_dispatch(mode: str, platform: str | None = None) -> str:
    """The concrete mode for ``mode`` on ``platform`` (default: jax's default backend):
    ``"auto"`` is ``"index"`` on CPU (block-sparse dropless experts) and ``"ragged"`` where XLA
    has a grouped-matmul kernel (TPU, GPU); any other mode is returned as given."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {mode!r}")
    if mode == "auto":
        return "index" if (platform or jax.default_backend()) == "cpu" else "ragged"
    return mode


# --------------------------------------------------------------------------------------------
# Data movement. Each takes tokens [G, S, d] and returns outputs [G, S, d].
# --------------------------------------------------------------------------------------------


def dispatch_slots(x_GSd: jax.Array, decision: routing.SlotDecision) -> jax.Array:
    """Gather each slot's token: [G, S, d] -> [G, E, C, d] (empty slots hold token 0, later
    weighted by zero)."""
    return jax.vmap(lambda x_Sd, tok_EC: x_Sd[tok_EC])(x_GSd, decision.token_index)


def combine_slots(y_GECd: jax.Array, decision: routing.SlotDecision) -> jax.Array:
    """Weighted scatter-add of slot outputs back to token positions: [G, E, C, d] -> [G, S, d].

    Sums in float32 (a token may collect up to E expert outputs) and returns y's dtype."""
    # Empty slots have weight 0 and hold a zeroed padding token or a real (finite) one, so a
    # plain product is safe.
    weight = jnp.where(decision.slot_valid, decision.combine_weight, 0.0)
    y = y_GECd.astype(jnp.float32) * weight[..., None]
    g, e, c, d = y.shape

    def one_group(y_ECd, tok_EC):
        out = jnp.zeros((decision.group_size, d), jnp.float32)
        return out.at[tok_EC.reshape(-1)].add(y_ECd.reshape(e * c, d))

    return jax.vmap(one_group)(y, decision.token_index).astype(y_GECd.dtype)


# Expert parallelism (sharding.py): groups G live on ("data", "expert"); the dispatched
# buffers move the expert mesh axis to E (an all-to-all), so each device runs its own experts.
# No-ops unless a mesh is set with jax.set_mesh.
GROUP_MAJOR = ("batch", None, "embed")  # [G, S, d]
EXPERT_MAJOR = ("batch_no_expert", "expert", None, "embed")  # [G, E, C, d]


def _slot_moe(experts: ExpertMlp, x_GSd, decision: routing.SlotDecision):
    x_GECd = sharding.constrain(dispatch_slots(x_GSd, decision), EXPERT_MAJOR)
    y_GECd = sharding.constrain(experts(x_GECd), EXPERT_MAJOR)
    return combine_slots(y_GECd, decision)


def _dropless_moe(experts: ExpertMlp, x_GSd, decision: routing.DroplessDecision, impl: str):
    g, s, d = x_GSd.shape
    k = decision.expert_index.shape[-1]
    expert_N = decision.expert_index.reshape(-1)  # N = G·S·K assignments; padding has id E
    order = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
    inverse = permute.inverse_permutation(order, order.shape[0])
    # Each token repeated K times (backward: a sum over K), then permuted by gathers only.
    x_Nd = jnp.repeat(x_GSd.reshape(g * s, d), k, axis=0)
    x_sorted = permute.take_rows(x_Nd, order, inverse)
    group_sizes = jnp.sum(jax.nn.one_hot(expert_N, decision.num_experts, dtype=jnp.int32), axis=0)
    y_sorted = experts.grouped(x_sorted, group_sizes, impl)
    # Rows past the routed total (padding assignments) are zeroed explicitly: backends are not
    # bound to zero them, and garbage times a zero weight can still be NaN.
    routed = jnp.arange(y_sorted.shape[0])[:, None] < group_sizes.sum()
    y_sorted = jnp.where(routed, y_sorted, 0).astype(jnp.float32)
    y_N = permute.take_rows(y_sorted, inverse, order)  # unsort
    w = decision.combine_weight.reshape(g * s, k, 1)
    y = jnp.sum(y_N.reshape(g * s, k, d) * w, axis=1)
    return y.reshape(g, s, d).astype(x_GSd.dtype)


def _onehot_moe(experts: ExpertMlp, x_GSd, decision: routing.RoutingDecision):
    """Reference path: dense one-hot dispatch/combine tensors and einsums (flaxformer/vmoe)."""
    dtype = x_GSd.dtype
    if isinstance(decision, routing.DroplessDecision):
        combine_GSE = routing.dense_combine_weights(decision).astype(dtype)
        return jnp.einsum("gse,gsed->gsd", combine_GSE, experts.all_tokens(x_GSd))
    s = decision.group_size
    dispatch_GECS = jax.nn.one_hot(decision.token_index, s, dtype=dtype)
    dispatch_GECS = dispatch_GECS * decision.slot_valid[..., None].astype(dtype)
    combine_GECS = dispatch_GECS * decision.combine_weight[..., None].astype(dtype)
    x_GECd = sharding.constrain(jnp.einsum("gecs,gsd->gecd", dispatch_GECS, x_GSd), EXPERT_MAJOR)
    return jnp.einsum("gecs,gecd->gsd", combine_GECS, experts(x_GECd))


# --------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------


class MoeMlp(nnx.Module):
    """Router + stacked experts in place of a dense MLP block.

    Args:
      emb_dim, mlp_dim: d and f (f is each expert's hidden width).
      router: an ``ExpertChoiceRouter`` or ``TopKRouter`` (its ``num_experts`` sets E).
      eval_router: the same router with the evaluation capacity (default: ``router``); used
        when the layer is called with ``train=False``.
      activations, naming, use_bias: as ``ExpertMlp``.
      group_size: tokens per routing group (see module docstring for ragged counts).
      group_multiple: the number of groups is made a multiple of this (``routing.routing_groups``).
      router_init_std: std of the router kernel's normal init.
      jitter_eps: multiplicative router-input noise in training (needs ``rng``).
      dispatch: "auto" | "index" | "ragged" | "onehot" (module docstring; resolved at
        construction with ``resolve_dispatch``).
      expert_bias: keep an auxiliary-loss-free selection bias (``RouterWeights``; top-K only).
      shared_mlp_dim: f_s, the total width of the shared experts (0: none).
      shared_expert_gate: scale the shared experts' output by sigmoid(x·g) (Qwen2-MoE).
      dtype: activation dtype of the experts; the router always computes in float32.
    """

    def __init__(
        self,
        emb_dim: int,
        mlp_dim: int,
        router: routing.Router,
        *,
        eval_router: routing.Router | None = None,
        activations=("gelu", "linear"),
        naming: str = "t5x",
        use_bias: bool = False,
        group_size: int = 4096,
        group_multiple: int = 1,
        router_init_std: float = 0.02,
        jitter_eps: float = 0.0,
        dispatch: str = "auto",
        expert_bias: bool = False,
        shared_mlp_dim: int = 0,
        shared_expert_gate: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if group_multiple < 1:
            raise ValueError(f"group_multiple must be >= 1, got {group_multiple}")
        if eval_router is not None and eval_router.num_experts != router.num_experts:
            raise ValueError("train and eval routers must have the same number of experts")
        self.routing_policy = router
        self.eval_routing_policy = eval_router or router
        self.group_size = group_size
        self.group_multiple = group_multiple
        self.jitter_eps = jitter_eps
        self.dispatch = resolve_dispatch(dispatch)
        self.dtype = dtype
        if expert_bias and not isinstance(router, routing.TopKRouter):
            raise ValueError("expert_bias (auxiliary-loss-free balancing) needs a top-K router")
        if shared_expert_gate and not shared_mlp_dim:
            raise ValueError("shared_expert_gate needs shared experts (shared_mlp_dim > 0)")
        self.router = RouterWeights(
            emb_dim, router.num_experts, router_init_std, expert_bias=expert_bias, rngs=rngs
        )
        if shared_mlp_dim:
            self.shared_expert = SharedMlp(
                emb_dim,
                shared_mlp_dim,
                activations,
                naming=naming,
                use_bias=use_bias,
                rngs=rngs,
                param_dtype=param_dtype,
            )
            if shared_expert_gate:
                init = nnx.initializers.normal(stddev=router_init_std)
                self.shared_expert_gate = Kernel(init, (emb_dim, 1), ("embed", None), rngs=rngs)
        self.expert = ExpertMlp(
            router.num_experts,
            emb_dim,
            mlp_dim,
            activations,
            naming=naming,
            use_bias=use_bias,
            rngs=rngs,
            param_dtype=param_dtype,
        )

    def groups(self, num_tokens: int) -> tuple[int, int]:
        """(G, S) for ``num_tokens`` tokens (``routing.routing_groups``)."""
        return routing.routing_groups(num_tokens, self.group_size, self.group_multiple)

    def route(
        self, x_GSd, token_mask_GS=None, *, rng=None, train=True, sequence_length=None
    ) -> routing.RoutingDecision:
        """The routing decision for groups ``x_GSd``. ``sequence_length``: the tokens per
        sequence in the flattened order (for ``seq_aux_loss``; default: all one sequence)."""
        logits = routing.router_logits(
            x_GSd, sharding.gathered(self.router.w.kernel), jitter_eps=self.jitter_eps, rng=rng
        )
        policy = self.routing_policy if train else self.eval_routing_policy
        if not isinstance(policy, routing.TopKRouter):
            return policy.route(logits, token_mask_GS)
        extra = {}
        if hasattr(self.router, "selection_bias"):
            extra["selection_bias"] = self.router.selection_bias[...]
        if policy.load_balancing_type == "seq_aux_loss":
            g, s = logits.shape[:2]
            length = sequence_length or g * s
            extra["segment_ids"] = (jnp.arange(g * s) // length).reshape(g, s)
            extra["num_segments"] = -(-(g * s) // length)
        return policy.route(logits, token_mask_GS, **extra)

    def __call__(
        self,
        x: jax.Array,
        token_mask: jax.Array | None = None,
        *,
        rng: jax.Array | None = None,
        train: bool = True,
    ) -> tuple[jax.Array, routing.RouterMetrics]:
        """x: [..., d] (usually [B, L, d]); token_mask: x.shape[:-1], True = real token.

        Returns the layer output (same shape as x, dtype ``self.dtype``) and the router metrics.
        Pass ``rng`` only in training (router jitter); ``train=False`` routes with
        ``eval_router`` (the evaluation capacity factor).
        """
        lead, d = x.shape[:-1], x.shape[-1]
        t = math.prod(lead)
        g, s = self.groups(t)
        mask_T = jnp.ones(t, bool) if token_mask is None else token_mask.reshape(t).astype(bool)
        # Padding rows are zeroed so that whatever they hold (NaN from a fully masked attention
        # row, say) cannot reach the router, the experts or the gradients.
        x_Td = jnp.where(mask_T[:, None], x.reshape(t, d), 0)
        pad = g * s - t
        if pad:
            x_Td = jnp.pad(x_Td, ((0, pad), (0, 0)))
            mask_T = jnp.pad(mask_T, (0, pad))
        x_GSd = sharding.constrain(x_Td.reshape(g, s, d), GROUP_MAJOR)
        # The router sees the input as given (fp32 math), the experts see it in self.dtype.
        length = lead[-1] if len(lead) > 1 else t
        decision = self.route(
            x_GSd, mask_T.reshape(g, s), rng=rng, train=train, sequence_length=length
        )
        x_GSd = x_GSd.astype(self.dtype)
        if self.dispatch == "onehot":
            y = _onehot_moe(self.expert, x_GSd, decision)
        elif isinstance(decision, routing.DroplessDecision):
            impl = "ragged_dot" if self.dispatch == "ragged" else "blocked"
            if expert_parallel.applicable(g, decision.num_experts):
                y = expert_parallel.dropless_moe(self.expert, x_GSd, decision, impl)
            else:
                y = _dropless_moe(self.expert, x_GSd, decision, impl)
        else:
            y = _slot_moe(self.expert, x_GSd, decision)
        y = sharding.constrain(y, GROUP_MAJOR)
        y = y.reshape(g * s, d)[:t].reshape(*lead, d)
        if hasattr(self, "shared_expert"):
            y = y + self._shared(x, mask_T[:t].reshape(lead)).astype(y.dtype)
        return y, decision.metrics

    def _shared(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """The shared experts on every real token (padding rows give zero), gated by
        sigmoid(x·g) when the layer has Qwen2-MoE's gate (the gate in float32)."""
        x = jnp.where(mask[..., None], x, 0).astype(self.dtype)
        y = self.shared_expert(x)
        if hasattr(self, "shared_expert_gate"):
            gate = x.astype(jnp.float32) @ self.shared_expert_gate.kernel[...].astype(jnp.float32)
            y = (jax.nn.sigmoid(gate) * y.astype(jnp.float32)).astype(y.dtype)
        return jnp.where(mask[..., None], y, 0)
