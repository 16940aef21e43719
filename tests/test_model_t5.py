"""T5 v1.1 (dense and MoE): HF parity, upcycling function preservation, training, KV-cache
decoding, abstract parameters and T5X paths, T5X loss semantics."""

import dataclasses
import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_upcycle import losses
from sparse_upcycle.checkpoints import hf_t5
from sparse_upcycle.models import t5
from sparse_upcycle.models.moe_config import MoeConfig

E = 4  # experts in the MoE tests


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, str(k)))
        else:
            yield "/".join((*prefix, str(k))), v


def _load(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)


@nnx.jit(static_argnames=("train",))
def _forward(model, enc, dec, train=False):
    return model(enc, dec, train=train)


def _tokens(seed, shape, vocab, pad_from=None):
    """Random ids in [2, vocab); row r is padded (0) from position pad_from[r] on."""
    ids = np.random.default_rng(seed).integers(2, vocab, size=shape)
    for r, start in enumerate(pad_from or []):
        ids[r, start:] = 0
    return jnp.asarray(ids, jnp.int32)


# --------------------------------------------------------------------------------------------
# 1. Parity with HF transformers (an independent implementation), and the name map.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["v1_1_untied", "v1_0_tied_scaled"])
def test_hf_parity_and_round_trip(tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = dict(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,  # lengths below reach the clipped last buckets
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    hf_cfg = transformers.T5Config(**kw, **({} if tied else {"tie_word_embeddings": False}))
    if not tied:
        hf_cfg.tie_word_embeddings = False  # transformers 5.x forces True in __post_init__
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if not tied:  # untying also untied the input embeddings: T5X has one table
        with torch.no_grad():
            hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
            hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}

    cfg = hf_t5.config_from_hf(hf_cfg.to_dict())
    assert cfg.logits_via_embedding == tied
    assert cfg.mlp_activations == ("gelu", "linear")
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.head_dim) == (2, 3, 8)
    params = hf_t5.from_hf(sd, cfg)
    model = t5.T5(cfg, rngs=nnx.Rngs(1))
    _load(model, params)

    enc = _tokens(0, (2, 36), 96, pad_from=[36, 23])
    dec = _tokens(1, (2, 20), 96).at[:, 0].set(0)  # decoder start token 0
    logits, aux = _forward(model, enc, dec)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(np.asarray(enc)),
            attention_mask=torch.tensor(np.asarray(enc != 0)),
            decoder_input_ids=torch.tensor(np.asarray(dec)),
        ).logits.numpy()
    assert aux == {}
    assert float(np.std(ref)) > 0.1  # a non-trivial comparison
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)

    back = hf_t5.to_hf(params, cfg)
    assert sorted(back) == sorted(sd)
    for name, value in sd.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_from_hf_refuses_bad_input():
    cfg = t5.config("tiny", num_encoder_layers=1, num_decoder_layers=1)
    params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), t5.abstract_params(cfg))
    sd = hf_t5.to_hf(params, cfg)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1
    with pytest.raises(ValueError, match="differs from shared"):
        hf_t5.from_hf(sd, cfg)
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match="lacks"):
        hf_t5.from_hf(sd, cfg)
    moe = dataclasses.replace(cfg, decoder_moe=MoeConfig(num_experts=2, layers=(0,)))
    with pytest.raises(ValueError, match="dense"):
        hf_t5.from_hf(hf_t5.to_hf(params, cfg), moe)


# --------------------------------------------------------------------------------------------
# 2. Upcycling: identical experts + weights summing to 1 preserve the dense model.
# --------------------------------------------------------------------------------------------


def _moe_cfg(dense: t5.T5Config) -> t5.T5Config:
    return dataclasses.replace(
        dense,
        # capacity = ceil(E·S/E) = S: every expert takes every real token; normalized weights.
        encoder_moe=MoeConfig(
            num_experts=E,
            layers=(0,),
            router="expert_choice",
            capacity_factor=E,
            eval_capacity_factor=E,
            normalize_combine_weights=True,
            group_size=8,  # 24 encoder tokens: 3 groups, some padding in them
            router_init_std=1.0,  # confident, uneven routing: the weights really differ
        ),
        # Train: capacity ceil((E/K)·S·K/E) = S (slot path, nothing dropped); eval: dropless.
        decoder_moe=MoeConfig(
            num_experts=E,
            layers=(0,),
            router="top_k",
            k=2,
            renormalize=True,
            capacity_factor=E / 2,
            eval_capacity_factor=None,
            router_init_std=1.0,
        ),
    )


def _upcycle(dense_params: dict, moe_model) -> dict:
    """Every MoE expert = the dense MLP; everything else copied; routers keep their init."""
    params = _pure(moe_model)

    def fill(dst, src):
        for k, v in src.items():
            if isinstance(dst[k], dict) and "expert" in dst[k]:  # an upcycled mlp
                for name, w in v.items():
                    dst[k]["expert"][name]["kernel"] = jnp.broadcast_to(
                        w["kernel"], (E, *w["kernel"].shape)
                    )
            elif isinstance(v, dict):
                fill(dst[k], v)
            else:
                dst[k] = v

    fill(params, dense_params)
    return params


def test_upcycled_moe_preserves_the_dense_model():
    dense_cfg = t5.config("tiny", num_encoder_layers=1, num_decoder_layers=1)
    dense = t5.T5(dense_cfg, rngs=nnx.Rngs(0))
    enc = _tokens(2, (2, 12), 128, pad_from=[12, 7])
    dec = _tokens(3, (2, 9), 128).at[:, 0].set(0)
    ref, _ = _forward(dense, enc, dec, train=False)

    moe = t5.T5(_moe_cfg(dense_cfg), rngs=nnx.Rngs(5))
    params = _upcycle(_pure(dense), moe)
    _load(moe, params)
    for train in (False, True):
        logits, aux = _forward(moe, enc, dec, train=train)
        assert aux["expert_load"].shape == (2, E)  # one encoder and one decoder MoE layer
        assert float(aux["dropped_fraction"]) == 0.0
        assert float(aux["entropy"]) > 0.1  # the routing weights really are spread out
        # Each token's output is Σ_e w_e·MLP(x) with Σ_e w_e = 1 up to fp32 rounding (~1e-7
        # relative per layer); logits are O(1), so 1e-5 absolute leaves a wide margin.
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Control: one expert that differs from the dense MLP visibly changes the model.
    wo = params["decoder"]["layers_0"]["mlp"]["expert"]["wo"]["kernel"]
    params["decoder"]["layers_0"]["mlp"]["expert"]["wo"]["kernel"] = wo.at[0].multiply(1.5)
    _load(moe, params)
    logits, _ = _forward(moe, enc, dec, train=False)
    assert float(jnp.abs(logits - ref).max()) > 1e-3


# --------------------------------------------------------------------------------------------
# 3. Training: jit + grad, loss goes down.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense_dropout", "moe"])
def test_adam_steps_lower_the_loss(kind):
    cfg = t5.config("tiny", dropout_rate=0.1, num_encoder_layers=1, num_decoder_layers=1)
    if kind == "moe":
        moe = dict(num_experts=E, layers=(0,))
        cfg = dataclasses.replace(
            cfg,
            dropout_rate=0.0,
            encoder_moe=dataclasses.replace(cfg.encoder_moe, jitter_eps=0.1, **moe),
            decoder_moe=dataclasses.replace(cfg.decoder_moe, **moe),
        )
    model = t5.T5(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    enc = _tokens(4, (4, 10), 128, pad_from=[10, 6, 8, 10])
    targets = _tokens(5, (4, 8), 128, pad_from=[8, 8, 5, 8])
    dec = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # shift right, start token 0
    weights = (targets != 0).astype(jnp.float32)

    def loss_fn(params, rng, train):
        logits, aux = nnx.merge(graphdef, params)(enc, dec, train=train, rng=rng)
        total, _, denom = losses.cross_entropy_loss(logits, targets, weights, z_loss=1e-4)
        loss = total / denom
        if aux:
            loss += 0.01 * aux["load_balancing_loss"] + 0.001 * aux["z_loss"]
        return loss

    eval_loss = jax.jit(lambda p: loss_fn(p, None, False))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng, True)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    opt_state = opt.init(params)
    before = float(eval_loss(params))
    for i in range(6):
        params, opt_state, grads = step(params, opt_state, jax.random.key(i))
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    after = float(eval_loss(params))
    assert after < before - 0.5, (before, after)
    if kind == "moe":
        router = grads["decoder"]["layers_0"]["mlp"]["router"]["w"]["kernel"][...]
        assert float(jnp.abs(router).max()) > 0


# --------------------------------------------------------------------------------------------
# 4. Incremental decoding.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense_tied", "moe"])
def test_kv_cache_decoding_matches_full_forward(kind):
    cfg = t5.config("tiny", num_encoder_layers=1, logits_via_embedding=kind == "dense_tied")
    if kind == "moe":  # dropless top-K: a token's routing does not depend on its group
        cfg = dataclasses.replace(
            cfg,
            encoder_moe=dataclasses.replace(cfg.encoder_moe, num_experts=E, layers=(0,)),
            decoder_moe=dataclasses.replace(
                cfg.decoder_moe, num_experts=E, eval_capacity_factor=None
            ),
        )
    model = t5.T5(cfg, rngs=nnx.Rngs(3))
    enc = _tokens(6, (2, 11), 128, pad_from=[11, 4])
    dec = _tokens(7, (2, 7), 128).at[:, 0].set(0)
    full, _ = _forward(model, enc, dec, train=False)

    mask = enc != 0
    encoded, _ = nnx.jit(lambda m, x: m.encode(x, encoder_mask=x != 0))(model, enc)
    cross = nnx.jit(lambda m, e: m.cross_kv(e))(model, encoded)
    step = nnx.jit(lambda m, tok, cache: m.decode_step(tok, cache, encoded, mask, cross_kv=cross))
    cache = model.init_cache(dec.shape[0], dec.shape[1] + 3)  # longer than needed
    stepped = []
    for t in range(dec.shape[1]):
        logits, cache = step(model, dec[:, t : t + 1], cache)
        stepped.append(logits)
    assert int(cache["index"]) == dec.shape[1]
    np.testing.assert_allclose(np.stack(stepped, 1), np.asarray(full), rtol=1e-5, atol=1e-5)

    # Greedy generate == argmax of the full causal forward over the growing prefix (no cache;
    # positions after the prefix are filler that causal attention never lets in).
    n = dec.shape[1] - 1
    gen = nnx.jit(lambda m, x: m.generate(x, n, eos_id=None))(model, enc)
    buf = jnp.zeros_like(dec)
    for t in range(n):
        logits, _ = _forward(model, enc, buf, train=False)
        buf = buf.at[:, t + 1].set(jnp.argmax(logits[:, t], -1))
    np.testing.assert_array_equal(np.asarray(gen), np.asarray(buf[:, 1:]))
    if kind == "moe":
        return
    sample = nnx.jit(lambda m, x, r: m.generate(x, 5, temperature=1.0, rng=r))
    a, b = sample(model, enc, jax.random.key(0)), sample(model, enc, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 5) and bool(((a >= 0) & (a < cfg.vocab_size)).all())


# --------------------------------------------------------------------------------------------
# 5. Abstract parameters, T5X paths, sizes.
# --------------------------------------------------------------------------------------------


def _t5x_paths(n_enc, n_dec, untied=True):
    """The parameter paths of T5X's t5x/examples/t5/network.py, written out independently."""
    attn = [f"{n}/kernel" for n in ("query", "key", "value", "out")]
    mlp = [f"mlp/{n}/kernel" for n in ("wi_0", "wi_1", "wo")]
    paths = {"token_embedder/embedding", "encoder/relpos_bias/rel_embedding"}
    paths |= {"encoder/encoder_norm/scale", "decoder/relpos_bias/rel_embedding"}
    paths |= {"decoder/decoder_norm/scale"} | ({"decoder/logits_dense/kernel"} if untied else set())
    for i in range(n_enc):
        p = f"encoder/layers_{i}/"
        paths |= {p + "pre_attention_layer_norm/scale", p + "pre_mlp_layer_norm/scale"}
        paths |= {p + "attention/" + a for a in attn} | {p + m for m in mlp}
    for i in range(n_dec):
        p = f"decoder/layers_{i}/"
        paths |= {p + f"pre_{n}_layer_norm/scale" for n in ("self_attention", "cross_attention")}
        paths |= {p + "pre_mlp_layer_norm/scale"} | {p + m for m in mlp}
        paths |= {
            p + b + "/" + a for b in ("self_attention", "encoder_decoder_attention") for a in attn
        }
    return paths


def test_abstract_params_match_real_ones_and_t5x_paths():
    cfg = t5.config("tiny", num_decoder_layers=3)
    moe_cfg = dataclasses.replace(
        cfg, decoder_moe=dataclasses.replace(cfg.decoder_moe, num_experts=E)
    )
    for c in (cfg, moe_cfg):
        abstract = dict(_flat(t5.abstract_params(c)))
        real = dict(_flat(_pure(t5.T5(c, rngs=nnx.Rngs(0)))))
        assert sorted(abstract) == sorted(real)
        for k, v in abstract.items():
            assert isinstance(v, jax.ShapeDtypeStruct), k
            assert (v.shape, v.dtype) == (real[k].shape, real[k].dtype) == (v.shape, jnp.float32)
    assert set(dict(_flat(t5.abstract_params(cfg)))) == _t5x_paths(2, 3)
    tied = t5.config("tiny", logits_via_embedding=True)
    assert set(dict(_flat(t5.abstract_params(tied)))) == _t5x_paths(2, 2, untied=False)

    moe_paths = dict(_flat(t5.abstract_params(moe_cfg)))  # every_other: decoder block 1
    assert moe_paths["decoder/layers_1/mlp/router/w/kernel"].shape == (32, E)
    assert moe_paths["decoder/layers_1/mlp/expert/wi_0/kernel"].shape == (E, 32, 64)
    assert moe_paths["decoder/layers_1/mlp/expert/wo/kernel"].shape == (E, 64, 32)
    assert "decoder/layers_0/mlp/wi_0/kernel" in moe_paths


def test_named_sizes_and_parameter_counts():
    base = t5.config("base")
    gc.collect()
    live = len(jax.live_arrays())
    leaves = jax.tree.leaves(t5.abstract_params(base))
    assert len(jax.live_arrays()) <= live  # ~1 GB of parameters described, none allocated
    # google/t5-v1_1-base has 247,577,856 parameters (HF num_parameters()).
    assert sum(math.prod(x.shape) for x in leaves) == 247_577_856
    xl = t5.config("xl")
    assert (xl.emb_dim, xl.num_heads, xl.mlp_dim, xl.num_decoder_layers) == (2048, 32, 5120, 24)
    small = t5.config("small", dtype=jnp.bfloat16, encoder_moe={"num_experts": 8})
    assert small.dtype == "bfloat16" and small.vocab_size == 32128
    assert small.encoder_moe.router == "expert_choice" and small.encoder_moe.num_experts == 8
    assert small.decoder_moe.router == "top_k" and small.decoder_moe.k == 2
    with pytest.raises(ValueError, match="unknown T5 size"):
        t5.config("huge")


# --------------------------------------------------------------------------------------------
# 6. Loss: T5X compute_weighted_cross_entropy semantics, against numpy.
# --------------------------------------------------------------------------------------------


def _numpy_loss(logits, targets, weights, z_loss, ls):
    logits = logits.astype(np.float64)
    v = logits.shape[-1]
    soft = np.full(logits.shape, ls / (v - 1))
    np.put_along_axis(soft, targets[..., None], 1.0 - ls, axis=-1)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    log_p = logits - log_z[..., None]
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1)), 0), -1)
    per_token = -np.sum(soft * log_p, -1) + z_loss * log_z**2 - entropy
    # T5X's custom gradient: (1 + 2·z_loss·log Z)·softmax - soft targets.
    grad = (1 + 2 * z_loss * log_z)[..., None] * np.exp(log_p) - soft
    w = weights
    return (per_token * w).sum(), (z_loss * log_z**2 * w).sum(), w.sum(), grad * w[..., None]


@pytest.mark.parametrize("z_loss,ls", [(0.0, 0.0), (1e-4, 0.0), (1e-2, 0.1)])
def test_cross_entropy_matches_numpy(z_loss, ls):
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(3, 5, 11)) + 2).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    loss, zl, wsum, grad = _numpy_loss(logits, targets, weights, z_loss, ls)

    def f(x):
        return losses.cross_entropy_loss(x, jnp.asarray(targets), jnp.asarray(weights), z_loss, ls)

    (got, got_z, got_w), vjp = jax.vjp(f, jnp.asarray(logits))
    np.testing.assert_allclose([got, got_z, got_w], [loss, zl, wsum], rtol=1e-5, atol=1e-6)
    (got_grad,) = vjp((jnp.ones(()), jnp.zeros(()), jnp.zeros(())))
    np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-6)
    if ls > 0:  # a perfect prediction of the smoothed targets scores 0 with z_loss = 0
        soft_logits = np.log(np.where(np.eye(11)[targets] > 0, 1 - ls, ls / 10))
        best, _, _ = losses.cross_entropy_loss(
            jnp.asarray(soft_logits), jnp.asarray(targets), label_smoothing=ls
        )
        assert abs(float(best)) < 1e-4
    no_w = losses.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets), None, z_loss, ls)
    assert float(no_w[2]) == 15.0
