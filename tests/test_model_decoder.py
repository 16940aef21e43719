"""Llama-style decoder: HF parity (Llama, Mixtral), checkpoint round trips, MoE function
preservation, training, KV-cache decoding and generation, abstract params, config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_upcycle.checkpoints import hf_llama
from sparse_upcycle.models import decoder as dec

MOE_TINY = "llama-moe-8x-top2-tiny"


# Jitted forward: eager calls compile every primitive afresh for each new shape (slow on CPU).
_forward = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw))


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, params) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)


def _tokens(shape, vocab, seed=0):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, vocab), np.int32)


def _flat_paths(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_paths(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


# --------------------------------------------------------------------------------------------
# 1. Parity with HF transformers (independent implementation) and checkpoint round trips.
# --------------------------------------------------------------------------------------------


def _randomize(hf_model, torch):
    """HF's N(0, 0.02) init gives near-zero logits, against which a 1e-4 tolerance would
    prove little: use O(1) weights and norm scales away from 1 so every term matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _hf_logits(hf_model, tokens, mask, torch):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            use_cache=False,
        )
    return out.logits.numpy()


def _state_dict(hf_model):
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_match_hf(tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000.0,  # not the default, so a theta mix-up shows
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        attention_bias=False,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    _randomize(hf_model, torch)
    cfg = hf_llama.config_from_hf(hf_cfg.to_dict())
    assert (cfg.rope_theta, cfg.num_key_value_heads, cfg.head_dim) == (1000.0, 2, 8)
    assert cfg.tie_word_embeddings == tied and not cfg.sparse_layers

    sd = _state_dict(hf_model)
    params = hf_llama.from_hf(sd, cfg)
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    _load(model, params)

    tokens = _tokens((2, 11), cfg.vocab_size)
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = False  # left padding in row 1
    want = _hf_logits(hf_model, tokens, mask, torch)
    got, aux = _forward(model, jnp.asarray(tokens), token_mask=jnp.asarray(mask))
    assert aux == {}
    assert np.abs(want).std() > 0.5  # logits are O(1), so 1e-4 is a real bound
    # Padding query rows are garbage in both implementations; compare real tokens only.
    # 1e-4 abs: fp32 with O(1) logits; observed ~1e-6, different op orders (torch vs XLA).
    np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=1e-4, rtol=0)

    # Round trip: exact, and tied checkpoints come back without lm_head (as HF saves them).
    back = hf_llama.to_hf(params, cfg)
    expected = {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert hf_llama.config_from_hf(hf_llama.config_to_hf(cfg)) == cfg


def test_mixtral_logits_match_hf_and_both_moe_layouts_round_trip():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=1000.0,
        sliding_window=None,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    hf_model = transformers.MixtralForCausalLM(hf_cfg).eval()
    _randomize(hf_model, torch)
    cfg = hf_llama.config_from_hf(hf_cfg.to_dict())
    assert cfg.sparse_layers == (0, 1) and cfg.moe.num_experts == 4 and cfg.moe.k == 2
    assert cfg.moe.capacity_factor is None and cfg.moe.ordering == "topk_then_softmax"

    sd = _state_dict(hf_model)
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 48, 32)
    params = hf_llama.from_hf(sd, cfg)
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    _load(model, params)
    tokens = _tokens((2, 10), cfg.vocab_size, seed=1)
    mask = np.ones(tokens.shape, bool)
    want = _hf_logits(hf_model, tokens, mask, torch)
    got, aux = _forward(model, jnp.asarray(tokens))
    assert np.abs(want).std() > 0.5
    # Same 1e-4 as Llama; a wrong gate/up split or a different top-2 would be O(1) off.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    assert aux["expert_load"].shape == (2, 4)

    back = hf_llama.to_hf(params, cfg)
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k], v) for k, v in sd.items())
    legacy = hf_llama.to_hf(params, cfg, moe_format="legacy")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in legacy
    again = hf_llama.from_hf(legacy, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)
    assert hf_llama.config_from_hf(hf_llama.config_to_hf(cfg)) == cfg


def test_from_hf_rejects_mismatched_checkpoints():
    cfg = dec.config("tiny")
    sd = hf_llama.to_hf(_params(dec.Decoder(cfg, rngs=nnx.Rngs(0))), cfg)
    with pytest.raises(ValueError, match="no 'lm_head.weight'"):
        hf_llama.from_hf({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(ValueError, match="does not use"):
        hf_llama.from_hf({**sd, "model.layers.2.input_layernorm.weight": np.ones(32)}, cfg)
    bad = {**sd, "model.norm.weight": np.ones(31, np.float32)}
    with pytest.raises(ValueError, match="final_norm/scale: shape"):
        hf_llama.from_hf(bad, cfg)
    tied = dec.config("tiny", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_llama.from_hf(sd, tied)
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        hf_llama.config_from_hf(
            {**hf_llama.config_to_hf(cfg), "rope_scaling": {"rope_type": "llama3"}}
        )


# --------------------------------------------------------------------------------------------
# 2. MoE with every expert a copy of the dense MLP computes the dense function.
# --------------------------------------------------------------------------------------------


def _upcycle_by_hand(dense_params, moe_params, num_experts):
    """Dense params everywhere, each expert a copy of its layer's dense MLP, routers kept."""
    out = dict(moe_params)
    for name, layer in dense_params.items():
        if not name.startswith("layers_"):
            out[name] = layer
            continue
        mlp = moe_params[name]["mlp"]
        experts = {
            n: {"kernel": np.broadcast_to(k["kernel"], (num_experts, *k["kernel"].shape))}
            for n, k in layer["mlp"].items()
        }
        out[name] = {**layer, "mlp": {"router": mlp["router"], "expert": experts}}
    return out


@pytest.mark.parametrize("capacity_factor", [None, 4.0])  # dropless; capacity = S (E/K = 4)
def test_moe_of_copied_experts_equals_dense(capacity_factor):
    dense = dec.Decoder(dec.config("tiny"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(_tokens((2, 12), 128, seed=2))
    want, _ = _forward(dense, tokens)

    def moe_logits(**moe_overrides):
        moe = dict(
            num_experts=8,
            layers=(0, 1),
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            router_init_std=1.0,  # confident, uneven routing: weights far from uniform
            **moe_overrides,
        )
        model = dec.Decoder(dec.config("tiny", moe=moe), rngs=nnx.Rngs(1))
        _load(model, _upcycle_by_hand(_params(dense), _params(model), 8))
        return _forward(model, tokens)

    got, aux = moe_logits()
    assert float(aux["dropped_fraction"]) == 0.0
    assert float(aux["top1_prob"]) > 0.2  # routing really is uneven, not 1/8 everywhere
    assert int((np.asarray(aux["expert_load"]) > 0).sum()) > 4  # several experts in use
    # topk_then_softmax weights sum to 1 up to one fp32 rounding, and all experts agree, so
    # the MoE output is the dense one times (1 ± 1e-7); expert matmuls run in a different
    # blocking (grouped/slot paths), also ~1e-7 relative. 1e-5 on O(1) logits covers both.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The check can fail: softmax over all 8 experts, then top-2, leaves weights summing to
    # less than 1, which shrinks every MLP output.
    if capacity_factor is None:
        off, _ = moe_logits(ordering="softmax_then_topk")
        assert float(jnp.abs(off - want).max()) > 1e-2


# --------------------------------------------------------------------------------------------
# 3. Training: jit + grad; Adam lowers the loss; bf16 activations.
# --------------------------------------------------------------------------------------------


def _lm_loss(graphdef, params, tokens, moe, train=True):
    model = nnx.merge(graphdef, params)
    logits, aux = model(tokens[:, :-1], train=train)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    total = ce
    if aux:
        total = total + moe.aux_loss_weight * aux["load_balancing_loss"]
        total = total + moe.router_z_loss_weight * aux["z_loss"]
    return total, (ce, logits)


@pytest.mark.parametrize("name", ["tiny", MOE_TINY])
def test_adam_steps_lower_loss(name):
    cfg = dec.config(name)
    graphdef, params = nnx.split(dec.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.adam(1e-2)
    tokens = jnp.asarray(_tokens((4, 16), cfg.vocab_size, seed=3))

    @jax.jit
    def step(params, opt_state):
        grad_fn = jax.value_and_grad(_lm_loss, argnums=1, has_aux=True)
        (_, (ce, _)), grads = grad_fn(graphdef, params, tokens, cfg.moe)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, grads

    opt_state = tx.init(params)
    losses = []
    for _ in range(6):
        params, opt_state, ce, grads = step(params, opt_state)
        losses.append(float(ce))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    if cfg.sparse_layers:  # gradients reach the router through the combine weights
        router_grad = nnx.to_pure_dict(grads)["layers_1"]["mlp"]["router"]["w"]["kernel"]
        assert float(jnp.abs(router_grad).max()) > 0


def test_bf16_activations():
    cfg32 = dec.config(MOE_TINY)
    cfg16 = dec.config(MOE_TINY, dtype="bfloat16")
    model = dec.Decoder(cfg16, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(_tokens((2, 12), cfg16.vocab_size, seed=4))
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(jax.value_and_grad(_lm_loss, argnums=1, has_aux=True), static_argnums=(0, 3, 4))
    (loss, (_, logits16)), grads = fn(graphdef, params, tokens, cfg16.moe, False)
    assert np.isfinite(float(loss)) and logits16.dtype == jnp.float32
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float32 and bool(jnp.isfinite(g).all())
    jaxpr = str(jax.make_jaxpr(lambda t: model(t))(tokens))
    assert "bf16" in jaxpr  # activations really are bf16
    ref = dec.Decoder(cfg32, rngs=nnx.Rngs(0))  # same seed: same fp32 params
    logits32, _ = _forward(ref, tokens[:, :-1])
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding) over 2 blocks; 5% of the logit
    # range is far below what a broken cast would give and far above bf16 noise.
    scale = float(jnp.abs(logits32).max())
    assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale


# --------------------------------------------------------------------------------------------
# 4. KV-cache decoding and generation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", MOE_TINY])
def test_cached_decoding_equals_full_forward(name):
    cfg = dec.config(name, tie_word_embeddings=name == "tiny")
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(_tokens((2, 9), cfg.vocab_size, seed=5))
    mask = np.ones(tokens.shape, bool)
    mask[1, :2] = False  # row 1 left-padded
    full, _ = _forward(model, tokens, token_mask=jnp.asarray(mask))

    extend = nnx.jit(lambda m, t, c, tm: m.extend(t, c, token_mask=tm))
    cache = model.init_cache(2, 12)
    pieces = []
    for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 8), (8, 9)]:  # chunks of 3 and single steps
        logits, cache = extend(model, tokens[:, lo:hi], cache, jnp.asarray(mask[:, lo:hi]))
        pieces.append(logits)
    assert int(cache.index) == 9
    cached = np.asarray(jnp.concatenate(pieces, axis=1))
    np.testing.assert_allclose(cached[mask], np.asarray(full)[mask], rtol=1e-5, atol=1e-5)


def test_generate_greedy_and_sampling():
    cfg = dec.config("tiny")  # dense: MoE decoding is covered by the cached-decoding test
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    prompt = jnp.asarray(_tokens((2, 5), cfg.vocab_size, seed=6))
    new = 6

    short = prompt[1, :3]
    greedy = model.generate(prompt, new)
    assert greedy.shape == (2, 5 + new)
    # A left-padded short prompt next to a full one.
    padded = jnp.stack([prompt[0], jnp.concatenate([jnp.zeros(2, prompt.dtype), short])])
    mask = jnp.asarray([[True] * 5, [False, False, True, True, True]])
    batch = model.generate(padded, new, prompt_mask=mask)

    # Reference without a cache or padding: full forward, argmax at each row's last token. The
    # buffer has its final length from the start (one compile); causality keeps the unfilled
    # tail from affecting earlier positions. Rows: prompt[0], prompt[1], short alone.
    seq = np.zeros((3, 5 + new), np.int32)
    seq[:2, :5], seq[2, :3] = prompt, short
    lengths = np.array([5, 5, 3])
    for _ in range(new):
        logits, _ = _forward(model, jnp.asarray(seq))
        next_tokens = np.asarray(jnp.argmax(logits, axis=-1))[np.arange(3), lengths - 1]
        seq[np.arange(3), lengths] = next_tokens
        lengths += 1
    np.testing.assert_array_equal(greedy, seq[:2])
    np.testing.assert_array_equal(batch[0], greedy[0])
    np.testing.assert_array_equal(batch[1, 5:], seq[2, 3 : 3 + new])

    s1 = model.generate(prompt, new, temperature=1.0, rng=jax.random.key(0))
    s2 = model.generate(prompt, new, temperature=1.0, rng=jax.random.key(0))
    s3 = model.generate(prompt, new, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(s1[:, :5], prompt)
    assert not np.array_equal(s1, s3)
    assert int(s1.min()) >= 0 and int(s1.max()) < cfg.vocab_size
    cold = model.generate(prompt, new, temperature=1e-4, rng=jax.random.key(2))
    np.testing.assert_array_equal(cold, greedy)  # T -> 0 is argmax
    with pytest.raises(ValueError, match="needs rng"):
        model.generate(prompt, new, temperature=0.7)


# --------------------------------------------------------------------------------------------
# 5. Abstract parameters and paths.
# --------------------------------------------------------------------------------------------


def _expected_paths(cfg):
    paths = {"token_embedder/embedding", "final_norm/scale"}
    if not cfg.tie_word_embeddings:
        paths.add("logits_dense/kernel")
    for i in range(cfg.num_hidden_layers):
        p = f"layers_{i}/"
        paths |= {p + "pre_attention_norm/scale", p + "pre_mlp_norm/scale"}
        paths |= {f"{p}attention/{n}/kernel" for n in ("query", "key", "value", "out")}
        if i in cfg.sparse_layers:
            paths.add(p + "mlp/router/w/kernel")
            paths |= {f"{p}mlp/expert/{n}/kernel" for n in ("wi_0", "wi_1", "wo")}
        else:
            paths |= {f"{p}mlp/{n}/kernel" for n in ("wi_0", "wi_1", "wo")}
    return paths


@pytest.mark.parametrize(
    "name,overrides",
    [("tiny", {}), ("tiny", {"tie_word_embeddings": True}), (MOE_TINY, {})],
)
def test_abstract_params_match_real_params(name, overrides):
    cfg = dec.config(name, **overrides)
    abstract = _flat_paths(dec.abstract_params(cfg))
    real = _flat_paths(_params(dec.Decoder(cfg, rngs=nnx.Rngs(0))))
    assert set(abstract) == set(real) == _expected_paths(cfg)
    for path, leaf in abstract.items():
        assert isinstance(leaf, jax.ShapeDtypeStruct), path
        assert (leaf.shape, leaf.dtype) == (real[path].shape, real[path].dtype), path
    if cfg.sparse_layers:
        e, d, f = 8, cfg.hidden_size, cfg.intermediate_size
        assert abstract["layers_1/mlp/expert/wi_0/kernel"].shape == (e, d, f)
        assert abstract["layers_1/mlp/expert/wo/kernel"].shape == (e, f, d)
        assert abstract["layers_1/mlp/router/w/kernel"].shape == (d, e)


def test_named_sizes_have_the_published_parameter_counts():
    def count(name):
        return sum(
            math.prod(a.shape) for a in jax.tree.leaves(dec.abstract_params(dec.config(name)))
        )

    assert count("llama3-1b") == 1_235_814_400  # Llama 3.2 1B (tied embeddings)
    assert count("llama2-7b") == 6_738_415_616  # Llama 2 7B


# --------------------------------------------------------------------------------------------
# 6. Configuration errors.
# --------------------------------------------------------------------------------------------


def test_non_causal_routing_is_refused_at_build():
    bpr = dict(batch_prioritized=True, capacity_factor=1.25, eval_capacity_factor=2.0)
    with pytest.raises(ValueError, match="batch_prioritized.*causal decoder"):
        dec.Decoder(dec.config(MOE_TINY, moe=bpr), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not causal"):
        dec.config(MOE_TINY, moe=dict(router="expert_choice", capacity_factor=2.0))
    with pytest.raises(ValueError, match="unknown decoder config"):
        dec.config("llama-9b")
    with pytest.raises(ValueError, match="unknown DecoderConfig fields"):
        dec.config("tiny", hidden_dim=8)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        dec.config("tiny", num_key_value_heads=3)
