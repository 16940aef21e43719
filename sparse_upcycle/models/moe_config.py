"""The ``moe`` block of a model config: which MLP blocks become MoE layers, and how they route.

Every model config (T5, ViT, decoder) holds one ``MoeConfig`` per stack. ``layers`` says which
0-indexed blocks are sparse:

* ``"every_other"``: blocks 1, 3, 5, … (half the MLP blocks, as in Komatsuzaki et al. 2023)
* ``"last_n:N"``: the last N blocks
* a list/tuple of block indices (or a string of them, "1,3" / "[1, 3]")
* ``"none"`` (or ``num_experts=0``): a dense model

Routing beyond the paper's (top-K only): ``score_function="sigmoid"`` (DeepSeek-V3),
``expert_bias`` with ``bias_update_rate`` (auxiliary-loss-free balancing, Wang et al. 2024: a
per-expert bias that only ranks experts, moved by the train step) and
``load_balancing_type="seq_aux_loss"`` (DeepSeek-V3's sequence-wise loss); see
``routing.TopKRouter``. The names follow Megatron-Core's ``moe_router_score_function``,
``moe_router_enable_expert_bias``, ``moe_router_bias_update_rate`` and
``moe_router_load_balancing_type``. ``num_shared_experts`` experts of width
``shared_expert_mlp_dim`` (default: the routed experts' width) see every token, optionally
behind Qwen2-MoE's sigmoid gate (``shared_expert_gate``); see ``moe.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_upcycle import moe, routing

ROUTER_KINDS = ("expert_choice", "top_k")
_FLOAT_FIELDS = (
    "capacity_factor",
    "eval_capacity_factor",
    "router_init_std",
    "jitter_eps",
    "aux_loss_weight",
    "router_z_loss_weight",
    "bias_update_rate",
)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    num_experts: int = 0
    layers: str | tuple[int, ...] = "every_other"
    router: str = "top_k"  # "expert_choice" | "top_k"
    k: int = 2  # top-K only
    capacity_factor: float | None = 1.25  # training; None = dropless (top-K only)
    eval_capacity_factor: float | None = 2.0  # evaluation / inference
    capacity_multiple: int = 1
    group_size: int = 4096
    group_multiple: int = 1  # >1: the number of groups is a multiple of it (routing.routing_groups)
    ordering: str = "softmax_then_topk"
    renormalize: bool = False
    batch_prioritized: bool = False
    normalize_combine_weights: bool = False  # expert choice only
    router_init_std: float = 0.02
    jitter_eps: float = 0.0
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    dispatch: str = "auto"  # "auto" | "index" | "ragged" | "onehot" (moe.resolve_dispatch)
    expert_mlp_dim: int | None = None  # None: the dense MLP's width (fine-grained experts: f/G)
    score_function: str = "softmax"  # "softmax" | "sigmoid" (top-K only)
    expert_bias: bool = False  # auxiliary-loss-free balancing (top-K only)
    bias_update_rate: float = 1e-3  # its γ: b_e += γ·sign(mean load − load_e) per step
    load_balancing_type: str = "aux_loss"  # "aux_loss" (Switch) | "seq_aux_loss" (DeepSeek-V3)
    num_shared_experts: int = 0
    shared_expert_mlp_dim: int | None = None  # each one's width; None: the routed experts'
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x·g) times the shared experts

    def __post_init__(self):
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"moe.router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.dispatch not in moe.DISPATCH_MODES:
            raise ValueError(
                f"moe.dispatch must be one of {moe.DISPATCH_MODES}, got {self.dispatch!r}"
            )
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        m = self.group_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"moe.group_multiple must be an integer >= 1, got {m!r}")
        n = self.num_shared_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"moe.num_shared_experts must be an integer >= 0, got {n!r}")
        for name in ("expert_mlp_dim", "shared_expert_mlp_dim"):
            width = getattr(self, name)
            if width is not None and (
                isinstance(width, bool) or not isinstance(width, int) or width < 1
            ):
                raise ValueError(f"moe.{name} must be an integer >= 1 or None, got {width!r}")
        if self.shared_expert_gate and not n and self.num_experts:
            raise ValueError("moe.shared_expert_gate needs moe.num_shared_experts >= 1")
        if self.score_function not in routing.SCORE_FUNCTIONS:
            raise ValueError(
                f"moe.score_function must be one of {routing.SCORE_FUNCTIONS}, got "
                f"{self.score_function!r}"
            )
        if self.load_balancing_type not in routing.LOAD_BALANCING_TYPES:
            raise ValueError(
                f"moe.load_balancing_type must be one of {routing.LOAD_BALANCING_TYPES}, got "
                f"{self.load_balancing_type!r}"
            )
        if self.router == "expert_choice":
            for name, off in (
                ("score_function", "softmax"),
                ("expert_bias", False),
                ("load_balancing_type", "aux_loss"),
            ):
                if getattr(self, name) != off:
                    raise ValueError(
                        f"moe.{name}={getattr(self, name)!r} is for top-K routing; expert "
                        f"choice uses softmax scores and needs no balancing (set moe.{name}="
                        f"{off!r} or moe.router='top_k')"
                    )
        if self.score_function == "sigmoid" and self.ordering != "softmax_then_topk":
            raise ValueError(
                "moe.score_function='sigmoid' scores each expert on its own, so there is no "
                "softmax to order against top-K: set moe.ordering='softmax_then_topk' (scores, "
                f"then top-K), got {self.ordering!r}"
            )
        for name in _FLOAT_FIELDS:  # nan/inf (e.g. 1e999) would overflow a capacity later
            value = getattr(self, name)
            capacity = name.endswith("capacity_factor")  # its sign: the router's check
            if value is None and capacity:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"moe.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or (value < 0 and not capacity):
                raise ValueError(
                    f"moe.{name} must be a finite number{'' if capacity else ' >= 0'}, "
                    f"got {value!r}"
                )

    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        """The 0-indexed blocks that are MoE layers, for a stack of ``num_layers`` blocks."""
        spec = self.layers
        if self.num_experts == 0 or spec == "none":
            return ()
        if spec == "every_other":
            return tuple(range(1, num_layers, 2))
        if spec == "all":  # every block (Mixtral)
            return tuple(range(num_layers))
        if isinstance(spec, str) and spec.startswith("last_n:"):
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(
                    f"moe.layers {spec!r}: expected last_n:N with an integer N"
                ) from None
            if not 0 <= n <= num_layers:
                raise ValueError(f"moe.layers {spec!r}: N must be in [0, {num_layers}]")
            return tuple(range(num_layers - n, num_layers))
        if isinstance(spec, str) and re.fullmatch(r"\[?\s*\d+(\s*,\s*\d+)*\s*,?\s*\]?", spec):
            spec = [int(i) for i in re.findall(r"\d+", spec)]  # "1,3" or "[1, 3]" from a CLI
        if isinstance(spec, str):
            raise ValueError(
                f"moe.layers {spec!r}: expected every_other, all, last_n:N, none or a list of "
                "indices"
            )
        layers = tuple(sorted(set(int(i) for i in spec)))
        if layers and not (0 <= layers[0] and layers[-1] < num_layers):
            raise ValueError(f"moe.layers {spec}: indices must be in [0, {num_layers})")
        return layers

    def capacity(self, train: bool, group_size: int | None = None) -> int | None:
        """Slots per expert in a group of ``group_size`` tokens (default: the configured
        ``group_size``), with the training or the evaluation capacity factor; None for dropless
        top-K. The formulas are ``routing.expert_choice_capacity`` / ``routing.top_k_capacity``
        (expert choice ceil(C·S/E), top-K ceil(C·S·K/E), rounded up to ``capacity_multiple``,
        at most S)."""
        s = self.group_size if group_size is None else int(group_size)
        factor = self.capacity_factor if train else self.eval_capacity_factor
        if self.router == "expert_choice":
            if factor is None:
                raise ValueError("expert choice needs a capacity factor (it has no dropless form)")
            return routing.expert_choice_capacity(
                s, self.num_experts, factor, self.capacity_multiple
            )
        return routing.top_k_capacity(s, self.num_experts, self.k, factor, self.capacity_multiple)

    def eval_drops(self) -> str | None:
        """Why evaluation routing can leave a token with less than its full weight, or None
        when it cannot. Expert choice reaches every token only when every expert takes the
        whole group (capacity = S); top-K drops nothing when an expert can hold every token of
        the group (each token picks an expert at most once), i.e. capacity = S or dropless.
        Checked at the configured group size: smaller groups (fewer tokens) then fit too."""
        s = self.group_size
        cap = self.capacity(train=False)
        if cap is None or cap >= s:
            return None
        return (
            f"{self.router} routing at evaluation has {cap} slots per expert for groups of "
            f"{s} tokens (eval_capacity_factor={self.eval_capacity_factor}), so tokens can be "
            "dropped"
        )

    def eval_routing_problem(self) -> str | None:
        """Why copies of one MLP behind this router would not compute that MLP at evaluation
        (whatever the router's scores), or None. Each token's output is Σ_e w_e·MLP(x), so it
        is MLP(x) exactly when the weights reaching it sum to one: expert choice at full
        capacity (every expert takes every token; the weights are a softmax over the E
        experts, normalised or not), top-K without drops whose K weights are renormalised
        (``renormalize`` or ``topk_then_softmax``; or K = E)."""
        if not self.num_experts:
            return None
        drops = self.eval_drops()
        if drops:
            return drops
        if self.router == "top_k" and self.score_function == "sigmoid" and not self.renormalize:
            return (
                f"top-{self.k} weights are sigmoid scores (renormalize=False), which do not sum "
                "to one"
            )
        if self.router == "top_k" and not (
            self.renormalize or self.ordering == "topk_then_softmax" or self.k >= self.num_experts
        ):
            return (
                f"top-{self.k} weights are softmax probabilities over {self.num_experts} "
                f"experts ({self.ordering}, renormalize=False), which do not sum to one"
            )
        return None

    def shared_mlp_dim(self, mlp_dim: int) -> int:
        """f_s, the shared experts' total width (0 without shared experts), for a dense MLP of
        width ``mlp_dim``: ``num_shared_experts`` × (``shared_expert_mlp_dim`` or the routed
        experts' width)."""
        width = self.shared_expert_mlp_dim or self.expert_mlp_dim or mlp_dim
        return self.num_shared_experts * width

    def make_router(self, capacity_factor: float | None, *, causal: bool) -> routing.Router:
        if self.router == "expert_choice":
            if capacity_factor is None:
                raise ValueError("expert choice needs a capacity factor (it has no dropless form)")
            return routing.ExpertChoiceRouter(
                self.num_experts,
                capacity_factor,
                self.capacity_multiple,
                self.normalize_combine_weights,
            )
        return routing.TopKRouter(
            self.num_experts,
            self.k,
            capacity_factor,
            self.capacity_multiple,
            self.ordering,
            self.renormalize,
            self.batch_prioritized,
            causal,
            self.score_function,
            self.load_balancing_type,
        )

    def make_layer(
        self,
        emb_dim: int,
        mlp_dim: int,
        activations: Sequence[str],
        *,
        causal: bool,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        naming: str = "t5x",
        use_bias: bool = False,
    ) -> moe.MoeMlp:
        return moe.MoeMlp(
            emb_dim,
            self.expert_mlp_dim or mlp_dim,
            self.make_router(self.capacity_factor, causal=causal),
            eval_router=self.make_router(self.eval_capacity_factor, causal=causal),
            activations=activations,
            naming=naming,
            use_bias=use_bias,
            group_size=self.group_size,
            group_multiple=self.group_multiple,
            router_init_std=self.router_init_std,
            jitter_eps=self.jitter_eps,
            dispatch=self.dispatch,
            expert_bias=self.expert_bias,
            shared_mlp_dim=self.shared_mlp_dim(mlp_dim),
            shared_expert_gate=self.shared_expert_gate,
            dtype=dtype,
            rngs=rngs,
        )


def average_metrics(metrics: Sequence[routing.RouterMetrics]) -> dict[str, jax.Array]:
    """Mean over MoE layers of each scalar (as T5X does) and per-layer ``expert_load``
    [num_moe_layers, E]; an empty dict for a dense model."""
    if not metrics:
        return {}
    out = {
        name: jnp.mean(jnp.stack([getattr(m, name) for m in metrics]))
        for name in ("load_balancing_loss", "z_loss", "dropped_fraction", "entropy", "top1_prob")
    }
    out["expert_load"] = jnp.stack([m.expert_load for m in metrics])
    return out
