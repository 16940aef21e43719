"""The parameters of an MoE layer and the matmuls over them (``moe.py`` routes and moves the
data): ``ExpertMlp`` (E stacked expert MLPs, with batched, all-token and grouped
applications), ``RouterWeights`` (the router kernel and the auxiliary-loss-free selection bias)
and ``SharedMlp`` (shared experts: a dense MLP over every token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import block_loop, permute, sharding
from sparse_upcycle.layers import Kernel, activation, fan_in_init, logical_param

# Parameter names of each ecosystem's MLP: (gated input names, plain input name, output name).
EXPERT_NAMING = {
    "t5x": (("wi_0", "wi_1"), "wi", "wo"),
    "big_vision": (None, "Dense_0", "Dense_1"),
}


class ExpertMlp(nnx.Module):
    """E stacked MLPs. ``activations`` has one name (plain: ``act(x·wi)·wo``) or two (gated:
    ``act_0(x·wi_0) * act_1(x·wi_1) · wo``, e.g. ("gelu", "linear") for T5 v1.1, ("silu",
    "linear") for SwiGLU). ``naming`` picks the parameter names of the dense MLP being
    mirrored: "t5x" (wi_0/wi_1/wi/wo) or "big_vision" (Dense_0/Dense_1, plain MLPs only).
    ``use_bias`` adds per-expert biases [E, f] and [E, d] (ViT)."""

    def __init__(
        self,
        num_experts,
        emb_dim,
        mlp_dim,
        activations=("gelu", "linear"),
        *,
        naming: str = "t5x",
        use_bias: bool = False,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if len(activations) not in (1, 2):
            raise ValueError(f"activations must have 1 (plain) or 2 (gated) names: {activations}")
        if naming not in EXPERT_NAMING:
            raise ValueError(f"naming must be one of {sorted(EXPERT_NAMING)}, got {naming!r}")
        self.activations = tuple(activations)
        for name in self.activations:
            activation(name)  # fail early on an unknown name
        gated_names, plain_name, out_name = EXPERT_NAMING[naming]
        self.input_names: tuple[str, ...] = (plain_name,)
        if self.gated:
            if gated_names is None:
                raise ValueError(f"{naming} naming has no gated MLP; use one activation")
            self.input_names = gated_names
        self.output_name = out_name
        init = fan_in_init(batch_axis=(0,))
        e, d, f = num_experts, emb_dim, mlp_dim

        def stacked(shape, axes):
            bias_axes = (axes[0], axes[2]) if use_bias else None
            return Kernel(init, shape, axes, rngs=rngs, dtype=param_dtype, bias_axes=bias_axes)

        for name in self.input_names:
            setattr(self, name, stacked((e, d, f), ("expert", "embed", "mlp")))
        setattr(self, out_name, stacked((e, f, d), ("expert", "mlp", "embed")))

    @property
    def gated(self) -> bool:
        return len(self.activations) == 2

    @property
    def num_experts(self) -> int:
        return getattr(self, self.output_name).kernel.shape[0]

    def _weights(self) -> dict:
        """name -> (kernel [E, ...], bias [E, ...] or None), gathered for the computation."""
        out = {}
        for name in (*self.input_names, self.output_name):
            layer = getattr(self, name)
            bias = layer.bias[...] if hasattr(layer, "bias") else None
            out[name] = (sharding.gathered(layer.kernel), bias)
        return out

    def _mlp(self, x: jax.Array, weights: dict, matmul) -> jax.Array:
        """The MLP on ``weights`` (``_weights()``'s layout, any leading expert shape), where
        ``matmul(a, kernel, bias_or_None)`` does the expert contraction (and bias) for the
        caller's layout, casting parameters to ``a.dtype``."""
        h = activation(self.activations[0])(matmul(x, *weights[self.input_names[0]]))
        if self.gated:
            h = h * activation(self.activations[1])(matmul(x, *weights[self.input_names[1]]))
        return matmul(h, *weights[self.output_name])

    def _apply(self, x: jax.Array, matmul) -> jax.Array:
        return self._mlp(x, self._weights(), matmul)

    def __call__(self, x_GECd: jax.Array) -> jax.Array:
        """Expert e applied to every buffer slot ``x[:, e]``: [G, E, C, d] -> [G, E, C, d].

        The matmuls run on expert-major [E, G·C, d] rows: a batched dot whose batch dimension
        is not leading makes XLA:CPU copy and transpose its operands at every matmul, forward
        and backward (2.3 of the 5.9 GB the T5-small MoE step adds over dense); one transpose
        each way here costs less."""
        g, e, c, d = x_GECd.shape
        x_END = x_GECd.transpose(1, 0, 2, 3).reshape(e, g * c, d)

        def matmul(a, w, b):
            y = jnp.einsum("end,edf->enf", a, w.astype(a.dtype))
            return y if b is None else y + b[:, None, :].astype(a.dtype)

        y = self._apply(x_END, matmul)
        return y.reshape(e, g, c, d).transpose(1, 0, 2, 3)

    def all_tokens(self, x_GSd: jax.Array) -> jax.Array:
        """Every expert on every token, [G, S, d] -> [G, S, E, d] (dropless reference only)."""
        g, s, d = x_GSd.shape
        x_GSEd = jnp.broadcast_to(x_GSd[:, :, None], (g, s, self.num_experts, d))

        def matmul(a, w, b):
            y = jnp.einsum("gsed,edf->gsef", a, w.astype(a.dtype))
            return y if b is None else y + b[None, None].astype(a.dtype)

        return self._apply(x_GSEd, matmul)

    def grouped(
        self, x_Nd: jax.Array, group_sizes_E: jax.Array, impl: str = "ragged_dot", block: int = 32
    ) -> jax.Array:
        """Rows sorted by expert, ``group_sizes_E[e]`` rows for expert e; rows past the total
        are not computed and come back zero.

        ``impl="ragged_dot"``: one ``jax.lax.ragged_dot`` grouped matmul per projection (fast
        on TPU/GPU; XLA:CPU lowers it to a dense masked matmul, E times the FLOPs).
        ``impl="blocked"`` (the CPU default): the first ceil(N/E) rows of each expert as one
        batched matmul, and the rows past them in block-sparse blocks of ``block`` rows, each
        block one expert's (MegaBlocks, Gale et al. 2022, §5), only the blocks in use computed
        (``_capacity_and_overflow``).
        """
        if impl == "ragged_dot":
            n = x_Nd.shape[0]
            row_expert = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(n), side="right")
            row_expert = jnp.minimum(row_expert, group_sizes_E.shape[0] - 1)

            def ragged(a, w, b):
                y = jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes_E)
                return y if b is None else y + b[row_expert].astype(a.dtype)

            return self._apply(x_Nd, ragged)
        if impl != "blocked":
            raise ValueError(f"grouped matmul impl must be ragged_dot or blocked, got {impl!r}")
        return self._capacity_and_overflow(x_Nd, group_sizes_E, block)

    def _capacity_and_overflow(self, x_Nd, group_sizes_E, block: int) -> jax.Array:
        """``grouped(impl="blocked")``: the first C = ceil(N/E) rows of every expert as one
        batched [E, C, d] matmul (the capacity path's layout: exactly N rows' FLOPs for any
        loads), and the rows past C (an expert busier than average) in blocks of ``block``
        rows, each block one expert's, run over the blocks in use only (``block_loop``).
        Balanced loads overflow by a few blocks; all rows on one expert make N - C overflow
        rows, so the cost stays below two N-row matmuls whatever the routing."""
        n, d = x_Nd.shape
        e = group_sizes_E.shape[0]
        cap = -(-n // e)
        end = jnp.cumsum(group_sizes_E)
        start = end - group_sizes_E
        r = jnp.arange(n)
        row_expert = jnp.searchsorted(end, r, side="right")  # E past the routed total
        routed = row_expert < e
        safe = jnp.minimum(row_expert, e - 1)
        pos = r - start[safe]
        in_cap = routed & (pos < cap)
        slot = jnp.where(in_cap, safe * cap + pos, e * cap)  # row -> slot (out of range: none)
        slot_row = permute.inverse_permutation(slot, e * cap)
        x_ECd = permute.take_rows(x_Nd, slot_row, slot).reshape(e, cap, d)

        def batched(a, w, b):
            y = jnp.einsum("end,edf->enf", a, w.astype(a.dtype))
            return y if b is None else y + b[:, None, :].astype(a.dtype)

        weights = self._weights()
        y_ECd = self._mlp(x_ECd, weights, batched)
        y_Nd = permute.take_rows(y_ECd.reshape(e * cap, -1), slot, slot_row)
        # Overflow: each expert's rows past C, padded to whole blocks, experts in order.
        over = jnp.maximum(group_sizes_E - cap, 0)
        padded = -(-over // block) * block
        padded_end = jnp.cumsum(padded)
        bound = -(-(n - cap + min(e, -(-n // cap)) * (block - 1)) // block) * block
        dest = jnp.where(routed & ~in_cap, (padded_end - padded)[safe] + pos - cap, bound)
        source = permute.inverse_permutation(dest, bound)
        x_blocks = permute.take_rows(x_Nd, source, dest).reshape(bound // block, block, d)
        block_expert = jnp.searchsorted(padded_end, jnp.arange(bound // block) * block, "right")
        block_expert = jnp.minimum(block_expert, e - 1)

        def one(a, w, b):
            y = a @ w.astype(a.dtype)
            return y if b is None else y + b.astype(a.dtype)

        y_blocks = block_loop.block_apply(
            lambda x_bd, w: self._mlp(x_bd, w, one),
            weights,
            x_blocks,
            block_expert,
            padded_end[-1] // block,
        )
        return y_Nd + permute.take_rows(y_blocks.reshape(bound, -1), dest, source)


class RouterWeights(nnx.Module):
    """The router's parameter ``w/kernel`` [d, E], init N(0, router_init_std²), no bias; with
    ``expert_bias`` also ``selection_bias`` [E] (zeros): the auxiliary-loss-free bias that
    only ranks experts (``routing.TopKRouter``). It is a parameter so that checkpoints,
    sharding and exports carry it, but no gradient reaches it and the train step replaces the
    optimizer's update of it by ``routing.selection_bias_update``."""

    def __init__(
        self, emb_dim, num_experts, router_init_std=0.02, *, expert_bias=False, rngs: nnx.Rngs
    ):
        init = nnx.initializers.normal(stddev=router_init_std)
        self.w = Kernel(init, (emb_dim, num_experts), ("embed", "unmodeled"), rngs=rngs)
        if expert_bias:
            self.selection_bias = logical_param(
                nnx.initializers.zeros, rngs.params(), (num_experts,), ("unmodeled",)
            )


class SharedMlp(nnx.Module):
    """A dense MLP over every token with the experts' parameter names (``EXPERT_NAMING``), so
    ``shared_expert/wi_0/kernel`` [d, f_s] mirrors the dense ``mlp/wi_0/kernel``; sharded like
    the dense MLP (``embed``, ``mlp``)."""

    def __init__(
        self,
        emb_dim,
        mlp_dim,
        activations,
        *,
        naming: str = "t5x",
        use_bias: bool = False,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if naming not in EXPERT_NAMING:
            raise ValueError(f"naming must be one of {sorted(EXPERT_NAMING)}, got {naming!r}")
        self.activations = tuple(activations)
        gated_names, plain_name, out_name = EXPERT_NAMING[naming]
        if len(self.activations) == 2 and gated_names is None:
            raise ValueError(f"{naming} naming has no gated MLP; use one activation")
        self.input_names = tuple(gated_names) if len(self.activations) == 2 else (plain_name,)
        self.output_name = out_name
        init = fan_in_init()

        def dense(shape, axes):
            bias = {"bias_axes": (axes[1],)} if use_bias else {}
            return Kernel(init, shape, axes, rngs=rngs, dtype=param_dtype, **bias)

        for name in self.input_names:
            setattr(self, name, dense((emb_dim, mlp_dim), ("embed", "mlp")))
        setattr(self, out_name, dense((mlp_dim, emb_dim), ("mlp", "embed")))

    def __call__(self, x: jax.Array) -> jax.Array:
        def proj(a, name):
            layer = getattr(self, name)
            y = a @ sharding.gathered(layer.kernel).astype(a.dtype)
            return y + layer.bias[...].astype(a.dtype) if hasattr(layer, "bias") else y

        first, *second = self.input_names
        h = activation(self.activations[0])(proj(x, first))
        if second:
            h = h * activation(self.activations[1])(proj(x, second[0]))
        return proj(h, self.output_name)
