"""Llama-style decoder-only language model (Llama, Qwen2, Qwen3), dense or with sparse MoE MLP
blocks (Flax NNX).

Architecture (Touvron et al. 2023, "Llama 2", §2.2; Grattafiori et al. 2024, "The Llama 3 Herd
of Models", §3.1.1): pre-norm residual blocks ``h = x + Attn(RMSNorm(x))``,
``y = h + MLP(RMSNorm(h))``, RMSNorm (Zhang & Sennrich 2019), rotary positions (Su et al. 2021)
in HF's half-split layout (``layers.apply_rope``), grouped-query attention (Ainslie et al.
2023) scaled by ``head_dim**-0.5``, SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (Shazeer 2020),
a final RMSNorm and logits from ``logits_dense`` or, when ``tie_word_embeddings``, from the
token embedding. No biases, except on the attention projections where ``attention_bias``
(q/k/v) and ``attention_out_bias`` (o) ask for them (Qwen2: q/k/v; HF Llama/Qwen3
``attention_bias``: all four); ``qk_norm`` adds Qwen3's per-head RMSNorm (weights of size
``head_dim``) on queries and keys after the projection, before RoPE (Yang et al. 2025, "Qwen3
Technical Report", §2, after Dehghani et al. 2023's QK-norm; transformers
``models/qwen3/modeling_qwen3.py``). MoE blocks (``config.moe``) replace the MLP with
``MoeConfig.make_layer(..., causal=True)``; the default routing is Mixtral's (Jiang et al. 2024,
§2.1): top-2 token choice, softmax over the two chosen logits, dropless.

Parameter paths (pure dict), one-to-one with HF ``LlamaForCausalLM`` / ``MixtralForCausalLM``
/ ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM``
(``checkpoints/hf_llama.py`` has the transposes, ``checkpoints/hf_qwen_moe.py`` the Qwen MoE
layers and Qwen2-MoE's gated shared expert):

=====================================  =========  =====================================
ours (``L`` = ``layers_{i}``)          shape      HF (``M`` = ``model.layers.{i}``)
=====================================  =========  =====================================
``token_embedder/embedding``           [V, d]     ``model.embed_tokens.weight``
``L/pre_attention_norm/scale``         [d]        ``M.input_layernorm.weight``
``L/attention/query/kernel``           [d, H·Dh]  ``M.self_attn.q_proj.weight``
``L/attention/{key,value}/kernel``     [d, K·Dh]  ``M.self_attn.{k,v}_proj.weight``
``L/attention/out/kernel``             [H·Dh, d]  ``M.self_attn.o_proj.weight``
``L/attention/query/bias`` (1)         [H·Dh]     ``M.self_attn.q_proj.bias``
``L/attention/{key,value}/bias`` (1)   [K·Dh]     ``M.self_attn.{k,v}_proj.bias``
``L/attention/out/bias`` (2)           [d]        ``M.self_attn.o_proj.bias``
``L/attention/query_norm/scale`` (3)   [Dh]       ``M.self_attn.q_norm.weight``
``L/attention/key_norm/scale`` (3)     [Dh]       ``M.self_attn.k_norm.weight``
``L/pre_mlp_norm/scale``               [d]        ``M.post_attention_layernorm.weight``
``L/mlp/{wi_0,wi_1}/kernel``           [d, f]     ``M.mlp.{gate,up}_proj.weight``
``L/mlp/wo/kernel``                    [f, d]     ``M.mlp.down_proj.weight``
``L/mlp/router/w/kernel`` (MoE)        [d, E]     ``M.mlp.gate.weight``
``L/mlp/expert/{wi_0,wi_1}/kernel``    [E, d, f]  ``M.mlp.experts.gate_up_proj``
``L/mlp/expert/wo/kernel``             [E, f, d]  ``M.mlp.experts.down_proj``
``final_norm/scale``                   [d]        ``model.norm.weight``
``logits_dense/kernel`` (untied only)  [d, V]     ``lm_head.weight``
=====================================  =========  =====================================

(1) ``attention_bias``, (2) ``attention_out_bias``, (3) ``qk_norm``.

Parameters are float32; ``config.dtype`` is the activation dtype. Attention softmax, norms,
RoPE and the router compute in float32 whatever it is; logits come back as float32.

Decoding: ``init_cache`` makes a ``DecodeCache`` (``models/decoding.py``), ``extend`` runs a
chunk of one or more tokens against it (prefill, then one token at a time) and ``generate``
does greedy or temperature sampling. With dropless routing the cached path computes the same
function as the full forward. With capacity-limited top-K it does not (a token's slot depends
on which tokens share its routing group, and a one-token step is a different group), so use
dropless for inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_upcycle import flop_terms, routing
from sparse_upcycle.layers import Dense, Embed, RMSNorm
from sparse_upcycle.models import remat as remat_lib
from sparse_upcycle.models import scan
from sparse_upcycle.models.decoder_blocks import DecoderBlock
from sparse_upcycle.models.decoder_sizes import NAMED_CONFIGS
from sparse_upcycle.models.decoding import DecodeCache, generate_loop
from sparse_upcycle.models.moe_config import MoeConfig, average_metrics

# The HF families a dense decoder is written back as (``DecoderConfig.model_type``).
DENSE_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# Decoder MoE default: Mixtral / Llama-3-MoE routing (top-2, softmax over the chosen two so
# the weights sum to 1, dropless). num_experts=0 keeps the model dense until asked otherwise.
DEFAULT_MOE = MoeConfig(
    num_experts=0,
    router="top_k",
    k=2,
    ordering="topk_then_softmax",
    capacity_factor=None,
    eval_capacity_factor=None,
)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Model dimensions with HF ``LlamaConfig`` field names (defaults are HF's: Llama-7B).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (plain multi-head attention),
    ``head_dim`` to ``hidden_size // num_attention_heads``. ``dtype`` is the activation dtype
    ("float32", "bfloat16"); parameters are always float32. ``initializer_range`` is the std
    of the embedding init (other kernels use T5X's fan-in init, as the experts do). ``moe``
    may be given as a dict of ``MoeConfig`` fields, merged over ``DEFAULT_MOE``.

    ``remat`` (``models/remat.py``; not an HF field) rematerialises every ``layers_i`` in the
    full forward pass (not in cached decoding): ``"none"`` keeps all activations,
    ``"dots_saveable"`` keeps every matmul output, ``"minimal"`` the matmuls without batch
    dimensions, ``"full"`` only each block's input. It changes memory and compute, never the
    function, so config equality ignores it. ``scan_layers`` (``models/scan.py``; not an HF
    field) runs the full forward's blocks as one ``jax.lax.scan`` (cached decoding stays
    unrolled); equality ignores it too.

    Qwen fields: ``attention_bias`` puts biases on the q/k/v projections and
    ``attention_out_bias`` on the output one (HF Qwen2 always has the first and never the
    second; HF Llama's and Qwen3's ``attention_bias`` means both); ``qk_norm`` is Qwen3's
    per-head q/k RMSNorm (eps ``rms_norm_eps``). ``model_type`` ("llama", "qwen2", "qwen3"; not
    a function of the model) is the HF family a dense model is exported as
    (``hf_llama.config_to_hf``, which refuses a structure that family cannot hold); config
    equality ignores it.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    dtype: str = "float32"
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    moe: MoeConfig = DEFAULT_MOE
    model_type: str = dataclasses.field(default="llama", compare=False)
    remat: str = dataclasses.field(default="none", compare=False)
    scan_layers: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        remat_lib.check(self.remat)
        if self.model_type not in DENSE_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {list(DENSE_MODEL_TYPES)}, got {self.model_type!r}"
            )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", dataclasses.replace(DEFAULT_MOE, **self.moe))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_size < 2 or self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.moe.sparse_layers(self.num_hidden_layers) and self.moe.router != "top_k":
            # Expert choice lets each expert pick tokens from the whole group, so a token's
            # output would depend on later tokens: not a causal language model.
            raise ValueError(
                f"moe.router={self.moe.router!r} is not causal; a decoder needs moe.router='top_k'"
            )

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return self.moe.sparse_layers(self.num_hidden_layers)

    @property
    def kv_heads(self) -> int:
        """``num_key_value_heads`` as ``__post_init__`` resolved it (never None)."""
        assert self.num_key_value_heads is not None
        return self.num_key_value_heads

    @property
    def head_size(self) -> int:
        """``head_dim`` as ``__post_init__`` resolved it (never None)."""
        assert self.head_dim is not None
        return self.head_dim


# --------------------------------------------------------------------------------------------
# Named sizes (``decoder_sizes.py``).
# --------------------------------------------------------------------------------------------


def config(name: str, **overrides: Any) -> DecoderConfig:
    """A named size (``NAMED_CONFIGS``) with field overrides; ``moe=`` may be a dict of
    ``MoeConfig`` fields, merged over the named config's MoE settings, or a ``MoeConfig``."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown decoder config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DecoderConfig fields {unknown}; known: {sorted(fields)}")
    kw = dict(NAMED_CONFIGS[name])
    moe = overrides.pop("moe", None)
    if isinstance(moe, MoeConfig):
        kw["moe"] = moe
    elif moe is not None:
        kw["moe"] = {**kw.get("moe", {}), **moe}
    kw.update(overrides)
    return DecoderConfig(**kw)


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------


class Decoder(nnx.Module):
    """Llama-style causal LM. See the module docstring for the parameter paths."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.token_embedder = Embed(
            c.vocab_size,
            c.hidden_size,
            init=nnx.initializers.normal(stddev=c.initializer_range),
            rngs=rngs,
        )
        # Kept apart from config (whose equality ignores remat) so the graphdef, and with it a
        # jit cache entry, differs between policies.
        self.remat, self.scan_layers = c.remat, c.scan_layers
        sparse = set(c.sparse_layers)
        for i in range(c.num_hidden_layers):
            setattr(self, f"layers_{i}", DecoderBlock(c, i in sparse, rngs=rngs))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs)
        if not c.tie_word_embeddings:
            self.logits_dense = Dense(c.hidden_size, c.vocab_size, ("embed", "vocab"), rngs=rngs)

    # ---- forward ------------------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        train: bool = False,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits for every position.

        Args:
          tokens: int [B, L].
          positions: int [B, L] RoPE positions (default ``arange(L)``, as HF's forward).
          token_mask: bool [B, L], False for padding: padding keys are never attended to and
            padding tokens are never routed or counted in router metrics.
          train: route with the training capacity (else the evaluation one).
          rng: router jitter noise key (training only; folded in per layer).

        Returns:
          float32 logits [B, L, V] and ``average_metrics`` of the MoE layers ({} if dense).
        """
        _, length = tokens.shape
        causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
        mask = causal[None, None]
        if token_mask is not None:
            mask = mask & token_mask.astype(bool)[:, None, None, :]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        logits, metrics, _ = self._run(tokens, positions, mask, token_mask, train, rng, None)
        return logits, average_metrics(metrics)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> DecodeCache:
        """An empty cache for ``max_len`` positions, in the activation dtype by default."""
        c = self.config
        shape = (batch, max_len, c.kv_heads, c.head_size)
        dtype = jnp.dtype(dtype or c.dtype)
        layers = c.num_hidden_layers
        return DecodeCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            key_mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def extend(
        self,
        tokens: jax.Array,
        cache: DecodeCache,
        *,
        positions: jax.Array | None = None,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, DecodeCache]:
        """Runs a chunk ``tokens`` [B, L] (a prompt, or one token) after the ``cache.index``
        tokens already cached (evaluation routing). Returns float32 logits [B, L, V] and the
        cache with the chunk appended. ``positions`` default to the cache slots
        ``index + arange(L)``; pass them for left-padded prompts. The caller keeps
        ``index + L <= cache.max_len`` (``dynamic_update_slice`` would clamp silently)."""
        _, length = tokens.shape
        if length > cache.max_len:
            raise ValueError(f"chunk of {length} tokens does not fit a cache of {cache.max_len}")
        index = cache.index
        new_mask = jnp.ones(tokens.shape, bool) if token_mask is None else token_mask.astype(bool)
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, new_mask, index, 1)
        q_slot = index + jnp.arange(length)
        causal = jnp.arange(cache.max_len)[None, :] <= q_slot[:, None]  # [L, T]
        mask = causal[None, None] & key_mask[:, None, None, :]
        if positions is None:
            positions = jnp.broadcast_to(q_slot, tokens.shape)
        logits, _, kv = self._run(tokens, positions, mask, token_mask, False, None, cache)
        keys, values = zip(*kv, strict=True) if kv else ((), ())
        return logits, DecodeCache(tuple(keys), tuple(values), key_mask, index + length)

    def _run(self, tokens, positions, mask, token_mask, train, rng, cache):
        c = self.config
        x = self.token_embedder(tokens, jnp.dtype(c.dtype))
        metrics: list[routing.RouterMetrics] = []
        new_kv = []
        if self.scan_layers and cache is None:
            blocks = [getattr(self, f"layers_{i}") for i in range(c.num_hidden_layers)]

            def body(layer, x, i):
                key = None if rng is None else jax.random.fold_in(rng, i)
                x, _, m = layer(
                    x,
                    positions=positions,
                    mask=mask,
                    token_mask=token_mask,
                    train=train,
                    rng=key,
                    cache=None,
                    cache_index=None,
                )
                return x, m

            x, metrics = scan.run(blocks, body, x, remat=self.remat)
            return self._logits(x), metrics, []

        def run(layer, x, positions, mask, token_mask, rng, cache, cache_index):
            return layer(
                x,
                positions=positions,
                mask=mask,
                token_mask=token_mask,
                train=train,
                rng=rng,
                cache=cache,
                cache_index=cache_index,
            )

        # Cached decoding is never differentiated: only the full forward is rematerialised.
        run = remat_lib.block(self.remat if cache is None else "none", run)
        for i in range(c.num_hidden_layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache, m = run(
                getattr(self, f"layers_{i}"),
                x,
                positions,
                mask,
                token_mask,
                None if rng is None else jax.random.fold_in(rng, i),
                layer_cache,
                None if cache is None else cache.index,
            )
            new_kv.append(layer_cache)
            if m is not None:
                metrics.append(m)
        return self._logits(x), metrics, new_kv

    def layer_inputs(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """The residual stream entering each block, ``{"layers_{i}/mlp": [B, L, d]}`` keyed by
        the block's MLP prefix (prompt-based router initialisation, ``router_init.py``)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        mask = (jnp.arange(tokens.shape[1])[None, :] <= jnp.arange(tokens.shape[1])[:, None])[
            None, None
        ]
        x = self.token_embedder(tokens, jnp.dtype(self.config.dtype))
        out = {}
        for i in range(self.config.num_hidden_layers):
            out[f"layers_{i}/mlp"] = x
            x, _, _ = getattr(self, f"layers_{i}")(
                x,
                positions=positions,
                mask=mask,
                token_mask=None,
                train=False,
                rng=None,
                cache=None,
                cache_index=None,
            )
        return out

    def _logits(self, x):
        x = self.final_norm(x)
        if self.config.tie_word_embeddings:
            logits = self.token_embedder.attend(x)
        else:
            logits = self.logits_dense(x)
        return logits.astype(jnp.float32)

    # ---- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: jax.Array,
        max_new_tokens: int,
        temperature: float = 0.0,
        rng: jax.Array | None = None,
        *,
        prompt_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Appends ``max_new_tokens`` tokens to each prompt: int [B, P + max_new_tokens].

        ``temperature=0`` is greedy (argmax); otherwise tokens are sampled from
        ``softmax(logits / temperature)`` with ``rng``. Prompts of different lengths are
        left-padded, with ``prompt_mask`` [B, P] False on the padding (RoPE positions then
        count real tokens only, as HF ``generate`` does). No stop token: every row gets
        exactly ``max_new_tokens``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature > 0 and rng is None:
            raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(...)")
        if prompt_mask is None:
            prompt_mask = jnp.ones(prompt_tokens.shape, bool)
        graphdef, state = nnx.split(self)
        return generate_loop(
            graphdef,
            state,
            jnp.asarray(prompt_tokens),
            jnp.asarray(prompt_mask, bool),
            jax.random.key(0) if rng is None else rng,
            jnp.float32(max(temperature, 1e-30)),
            max_new_tokens=max_new_tokens,
            sample=temperature > 0,
        )


def abstract_params(config: DecoderConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --------------------------------------------------------------------------------------------
# The family's face (``models/__init__.py``).
# --------------------------------------------------------------------------------------------

Config = DecoderConfig
Model = Decoder
MOE_FIELDS = ("moe",)
MLP_WIDTH_FIELD = "intermediate_size"
EMBEDDING = "token_embedder/embedding"  # the token embedding [V, d] (router_init cheap_embed)
TASK = "lm"
TOKENS_KEY = "tokens"
HF_MAP = "sparse_upcycle.checkpoints.hf_llama"
HF_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_TOKEN_KEYS = ("tokens", "inputs", "input_tokens", "decoder_input_tokens", "targets")


def moe_layer_names(cfg: DecoderConfig) -> list[str]:
    return [f"layers_{i}" for i in cfg.moe.sparse_layers(cfg.num_hidden_layers)]


def forward(model: Decoder, batch: dict, train: bool, rng):
    """(logits, targets, weights, router metrics) of a language-model batch."""
    weights = batch["weights"]
    logits, aux = model(batch["tokens"], token_mask=weights > 0, train=train, rng=rng)
    return logits, batch["targets"], weights, aux


def example_inputs(cfg: DecoderConfig, seed: int = 0) -> tuple:
    """Two random 16-token sequences, the inputs ``verify`` compares the models on."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 16))),)


def batch_lengths(batch) -> tuple[int, int, int]:
    """(batch size, sequence length, sequence length) of a dict batch or ``(B, L)``."""
    if isinstance(batch, Mapping):
        b, l = flop_terms.pick(batch, _TOKEN_KEYS, "decoder")[:2]
        return b, l, l
    sizes = (batch,) if isinstance(batch, int) else tuple(int(n) for n in batch)
    if len(sizes) == 2 or len(sizes) == 3:
        return sizes[0], sizes[1], sizes[1]
    raise ValueError(f"decoder batch {sizes}: expected (batch_size, seq_len) or a dict of arrays")


def forward_flops(cfg: DecoderConfig, b: int, s: int, l: int, train: bool) -> dict[str, int]:
    """Forward model FLOPs by component (``flops.py``): GQA attention, SwiGLU MLPs (two input
    projections), and logits for every token."""
    out = flop_terms.zeros()
    d, dh = cfg.hidden_size, cfg.head_size
    n = b * l
    heads, kv = cfg.num_attention_heads, cfg.kv_heads
    for _ in range(cfg.num_hidden_layers):
        flop_terms.add_attention(out, flop_terms.attention(d, heads, kv, dh, n, n, l))
    flop_terms.mlp_stack(out, cfg.moe, cfg.num_hidden_layers, d, cfg.intermediate_size, 2, n, train)
    out["logits"] = 2 * d * cfg.vocab_size * n
    return out
