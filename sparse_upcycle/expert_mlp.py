"""The parameters of an MoE layer and the matmuls over them (``moe.py`` routes and moves the
data): ``ExpertMlp`` (E stacked expert MLPs, with batched, all-token and grouped
applications), ``RouterWeights`` (the router kernel and the auxiliary-loss-free selection bias)
and ``SharedMlp`` (shared experts: a dense MLP over every token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import permute, sharding
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

    def _apply(self, x: jax.Array, matmul) -> jax.Array:
        """The MLP, where ``matmul(a, kernel, bias_or_None)`` does the expert contraction (and
        bias) for the caller's layout, casting parameters to ``a.dtype``."""

        def proj(a, name):
            layer = getattr(self, name)
            bias = layer.bias[...] if hasattr(layer, "bias") else None
            return matmul(a, sharding.gathered(layer.kernel), bias)

        h = activation(self.activations[0])(proj(x, self.input_names[0]))
        if self.gated:
            h = h * activation(self.activations[1])(proj(x, self.input_names[1]))
        return proj(h, self.output_name)

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
        self, x_Nd: jax.Array, group_sizes_E: jax.Array, impl: str = "ragged_dot", block: int = 128
    ) -> jax.Array:
        """Rows sorted by expert, ``group_sizes_E[e]`` rows for expert e; rows past the total
        are not computed and come back zero.

        ``impl="ragged_dot"``: one ``jax.lax.ragged_dot`` grouped matmul per projection (fast
        on TPU/GPU; XLA:CPU lowers it to a dense masked matmul, E times the FLOPs).
        ``impl="blocked"``: block-sparse in the manner of MegaBlocks (Gale et al. 2022, §5):
        each expert's rows are padded to a multiple of ``block``, and a scan runs one
        [block, d] x [d, f] matmul per block with that block's expert weights. The block count
        is the static bound ceil((N + E·(block-1)) / block), so up to E·block rows beyond N are
        computed (on zeros) and thrown away.
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
        n, d = x_Nd.shape
        e = group_sizes_E.shape[0]
        padded = -(-group_sizes_E // block) * block
        padded_end = jnp.cumsum(padded)
        raw_end = jnp.cumsum(group_sizes_E)
        rows = -(-(n + e * (block - 1)) // block) * block  # static bound on padded rows
        row_expert = jnp.searchsorted(raw_end, jnp.arange(n), side="right")  # E past the total
        safe = jnp.minimum(row_expert, e - 1)
        dest = (padded_end - padded)[safe] + jnp.arange(n) - (raw_end - group_sizes_E)[safe]
        dest = jnp.where(row_expert < e, dest, rows)  # out of range: dropped below
        source = permute.inverse_permutation(dest, rows)  # block row -> input row (n: padding)
        x_blocks = permute.take_rows(x_Nd, source, dest).reshape(rows // block, block, d)
        block_expert = jnp.searchsorted(padded_end, jnp.arange(rows // block) * block, "right")

        def one_block(_, xs):
            # No lax.cond to skip unused blocks: under grad it costs more than the blocks.
            x_bd, expert = xs
            expert = jnp.minimum(expert, e - 1)

            def pick(a, w, b):
                y = a @ jax.lax.dynamic_index_in_dim(w, expert, keepdims=False).astype(a.dtype)
                if b is None:
                    return y
                return y + jax.lax.dynamic_index_in_dim(b, expert, keepdims=False).astype(a.dtype)

            return None, self._apply(x_bd, pick)

        # Without the checkpoint the forward saves each block's slice of every weight for the
        # backward ([blocks, d, f] per matrix, more bytes than the weights themselves); the
        # policy keeps the matmul outputs and re-reads the slices instead.
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        _, y_blocks = jax.lax.scan(
            jax.checkpoint(one_block, policy=policy), None, (x_blocks, block_expert)
        )
        return permute.take_rows(y_blocks.reshape(rows, d), dest, source)


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
