"""ViT (models/vit.py) and its HF map (checkpoints/hf_vit.py): HF parity, MoE function
preservation, training, abstract shapes and big_vision paths."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_upcycle.checkpoints import hf_vit
from sparse_upcycle.models import vit

BATCH = 3


def _images(batch=BATCH, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 28, 28, 1)).astype(np.float32)


def _with_params(config, params):
    model = vit.ViT(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


# --------------------------------------------------------------------------------------------
# 1. Parity with HF transformers, and the round trip.
# --------------------------------------------------------------------------------------------


def _random_hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=5,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    # HF zero-inits biases and LayerNorm shifts: randomise everything, so that every entry of
    # the map (and the class-token position fold) matters for the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("cls_token", "position_embeddings")):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.ndim >= 2:  # Linear / Conv2d weights [out, in, ...]
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return cfg, model


def _hf_logits(model, images):
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()


def test_hf_parity_and_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_cfg, hf_model = _random_hf_model()
    config = hf_vit.config_from_hf(hf_cfg.to_dict())
    assert (config.width, config.depth, config.mlp_dim, config.num_heads) == (32, 2, 64, 4)
    assert (config.patch_size, config.image_size, config.num_channels) == ((7, 7), (28, 28), 1)
    assert (config.num_classes, config.mlp_act, config.layer_norm_eps) == (5, "gelu_exact", 1e-6)

    hf_model.save_pretrained(tmp_path / "hf")
    file_sd = load_file(str(tmp_path / "hf" / "model.safetensors"))  # checkpoint-file names
    memory_sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}  # transformers-5 names
    assert "vit.encoder.layer.0.attention.attention.query.weight" in file_sd
    params = hf_vit.from_hf(file_sd, config)
    jax.tree.map(np.testing.assert_array_equal, hf_vit.from_hf(memory_sd, config), params)

    images = _images()
    ref = _hf_logits(hf_model, images)
    assert np.abs(ref).max() > 0.5  # not a near-zero output that anything would match
    logits, aux = jax.jit(lambda m, x: m(x))(_with_params(config, params), images)
    assert aux == {}
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-5)  # seen: 5e-7

    # to_hf ∘ from_hf: exact except the folded class position (documented in hf_vit).
    back = hf_vit.to_hf(params, config)
    assert sorted(back) == sorted(file_sd)
    for key in file_sd:
        if key not in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"):
            np.testing.assert_array_equal(back[key], file_sd[key], err_msg=key)
    pos, pos_back = (
        file_sd["vit.embeddings.position_embeddings"],
        back["vit.embeddings.position_embeddings"],
    )
    np.testing.assert_array_equal(pos_back[:, 1:], pos[:, 1:])
    np.testing.assert_array_equal(
        back["vit.embeddings.cls_token"] + pos_back[:, :1],
        file_sd["vit.embeddings.cls_token"] + pos[:, :1],
    )
    # from_hf ∘ to_hf is the identity.
    jax.tree.map(np.testing.assert_array_equal, hf_vit.from_hf(back, config), params)

    # HF itself loads what to_hf writes and computes the same logits.
    import transformers

    hf_cfg.save_pretrained(tmp_path / "back")
    save_file(back, str(tmp_path / "back" / "model.safetensors"), metadata={"format": "pt"})
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(_hf_logits(reloaded, images), ref, rtol=0, atol=1e-5)


def test_from_hf_rejects_bad_input():
    config = vit.config("tiny", num_classes=5)
    sd = hf_vit.to_hf(_params(vit.ViT(config, rngs=nnx.Rngs(0))), config)
    with pytest.raises(ValueError, match="does not use"):
        hf_vit.from_hf(
            {**sd, "vit.encoder.layer.9.output.dense.bias": sd["classifier.bias"]}, config
        )
    with pytest.raises(ValueError, match="expected shape"):
        hf_vit.from_hf({**sd, "classifier.bias": np.zeros(7, np.float32)}, config)
    with pytest.raises(ValueError, match="dense"):
        hf_vit.from_hf(sd, dataclasses.replace(config, moe=dict(num_experts=4)))
    # HF's unused pooler is dropped, not an error.
    pooled = {**sd, "vit.pooler.dense.bias": sd["classifier.bias"]}
    jax.tree.map(
        np.testing.assert_array_equal, hf_vit.from_hf(pooled, config), hf_vit.from_hf(sd, config)
    )


# --------------------------------------------------------------------------------------------
# 2. MoE function preservation.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [17, 12])  # one image per group | straddling + padding
def test_moe_with_copied_experts_equals_dense(group_size):
    """Expert choice with capacity factor E gives every expert all S tokens of its group, so
    each token's combine weights sum to 1 (they are its softmax over all E experts, and are
    normalised besides); with every expert a copy of the dense MLP the MoE block computes
    (Σ_e w_e)·MLP(x) = MLP(x). Tolerance 1e-5 (seen: 1e-6): the only differences are fp32
    rounding of the weights and the order of the E-term sum."""
    e = 4
    dense_cfg = vit.config("tiny", depth=4, num_classes=5, head_zeroinit=False)
    moe_cfg = dataclasses.replace(
        dense_cfg,
        moe=dict(
            num_experts=e,
            capacity_factor=float(e),
            eval_capacity_factor=float(e),
            group_size=group_size,
            router_init_std=1.0,  # confident, uneven routing weights
        ),
    )
    assert moe_cfg.moe.sparse_layers(moe_cfg.depth) == (1, 3)
    rng = np.random.default_rng(1)
    dense = jax.tree.map(
        lambda p: (p + 0.1 * rng.normal(size=p.shape)).astype(np.float32),
        _params(vit.ViT(dense_cfg, rngs=nnx.Rngs(0))),
    )
    moe_params = _params(vit.ViT(moe_cfg, rngs=nnx.Rngs(1)))
    for key, value in _flat(dense).items():
        parts = key.split("/")
        block = parts[1] if len(parts) > 1 else ""
        if block in ("encoderblock_1", "encoderblock_3") and parts[2] == "MlpBlock_0":
            expert = moe_params["Transformer"][block]["MlpBlock_0"]["expert"]
            expert[parts[3]][parts[4]] = np.broadcast_to(value, (e, *value.shape)).copy()
        else:
            node = moe_params
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value

    images = _images()
    dense_model = _with_params(dense_cfg, dense)
    moe_model = _with_params(moe_cfg, moe_params)

    @jax.jit
    def fwd(model, x):  # eval and train routing (eval_router vs router) in one compilation
        return model(x), model(x, train=True, rng=jax.random.key(0))

    dense_out = fwd(dense_model, images)
    for (ref, _), (got, aux) in zip(dense_out, fwd(moe_model, images), strict=True):
        assert float(aux["dropped_fraction"]) == 0.0
        assert float(aux["entropy"]) < math.log(e) - 0.05  # the weights really are uneven
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)

    # The MoE blocks are on the path: shifting expert e's output bias by (e + 1)·v moves every
    # token by Σ_e w_e·(e + 1)·v, at least v (one expert alone may hold ~0 weight for the
    # class token). v is not constant across features, which the final LayerNorm would remove.
    bias = moe_params["Transformer"]["encoderblock_3"]["MlpBlock_0"]["expert"]["Dense_1"]["bias"]
    bias += np.arange(1, e + 1, dtype=np.float32)[:, None] * rng.normal(size=bias.shape[1])
    (changed, _), _ = fwd(_with_params(moe_cfg, moe_params), images)
    assert np.abs(np.asarray(changed) - np.asarray(dense_out[0][0])).max() > 1e-2


# --------------------------------------------------------------------------------------------
# 3. Training: jit + grad + adam, dense and MoE; bf16 activations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [0, 4])
def test_adam_steps_lower_the_loss(num_experts):
    config = vit.config(
        "tiny", dropout=0.1, moe=dict(num_experts=num_experts, group_size=34, jitter_eps=0.01)
    )
    graphdef, params = nnx.split(vit.ViT(config, rngs=nnx.Rngs(0)), nnx.Param)
    images = jnp.asarray(_images(batch=8, seed=2))
    labels = jnp.arange(8) % config.num_classes
    tx = optax.adam(3e-3)

    def loss_fn(params, rng, train):
        logits, aux = nnx.merge(graphdef, params)(images, train=train, rng=rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss + 1e-3 * aux.get("z_loss", 0.0)

    @jax.jit
    def step(params, opt_state, rng):
        grads = jax.grad(loss_fn)(params, rng, True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    eval_loss = jax.jit(lambda p: loss_fn(p, None, False))
    before = float(eval_loss(params))
    opt_state = tx.init(params)
    for i in range(8):
        params, opt_state = step(params, opt_state, jax.random.key(i))
    after = float(eval_loss(params))
    assert after < before - 0.1, (before, after)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("num_experts", [0, 4])
def test_bf16_activations(num_experts):
    cfg32 = vit.config("tiny", head_zeroinit=False, moe=dict(num_experts=num_experts))
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    params = _params(vit.ViT(cfg32, rngs=nnx.Rngs(0)))
    images = _images()
    graphdef, state = nnx.split(_with_params(cfg16, params), nnx.Param)

    def logits_and_grads(state):
        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(images)
            return logits.sum(), logits

        return jax.grad(loss, has_aux=True)(state)

    assert "bf16[3,17,32]" in str(jax.make_jaxpr(logits_and_grads)(state))  # residual stream
    grads, logits16 = jax.jit(logits_and_grads)(state)
    logits32, _ = jax.jit(lambda m, x: m(x))(_with_params(cfg32, params), images)
    assert logits16.dtype == jnp.float32 and bool(jnp.isfinite(logits16).all())
    # bf16 keeps ~3 significant digits; two blocks of it stay well inside 0.1 of fp32.
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.1)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------
# 4. Abstract parameters, big_vision paths, named configs.
# --------------------------------------------------------------------------------------------


def _big_vision_paths(depth, sparse):
    """Paths written out from big_vision's vit.py (nn.Conv "embedding", "pos_embedding", "cls",
    Encoder "Transformer"/"encoderblock_i"/"encoder_norm", linen MHA, MlpBlock, "head")."""
    paths = {"embedding/kernel", "embedding/bias", "pos_embedding", "cls", "head/kernel"}
    paths |= {"head/bias", "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            paths |= {b + ln + "/scale", b + ln + "/bias"}
        for proj in ("query", "key", "value", "out"):
            paths |= {f"{b}MultiHeadDotProductAttention_0/{proj}/{w}" for w in ("kernel", "bias")}
        mlp = b + "MlpBlock_0/" + ("expert/" if i in sparse else "")
        paths |= {f"{mlp}Dense_{j}/{w}" for j in (0, 1) for w in ("kernel", "bias")}
        if i in sparse:
            paths.add(b + "MlpBlock_0/router/w/kernel")
    return paths


def test_abstract_params_shapes_and_paths():
    config = vit.config("tiny", depth=3, num_classes=5, moe=dict(num_experts=4))
    abstract = vit.abstract_params(config)
    real = _params(vit.ViT(config, rngs=nnx.Rngs(0)))
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert a.shape == r.shape and a.dtype == r.dtype == jnp.float32
    flat = {k: v.shape for k, v in _flat(abstract).items()}
    assert set(flat) == _big_vision_paths(3, sparse={1})
    w, h, f, e = 32, 2, 64, 4
    blk = "Transformer/encoderblock_"
    assert flat["embedding/kernel"] == (7, 7, 1, w)
    assert flat["pos_embedding"] == (1, 16, w) and flat["cls"] == (1, 1, w)
    assert flat[blk + "0/MultiHeadDotProductAttention_0/query/kernel"] == (w, h, w // h)
    assert flat[blk + "0/MultiHeadDotProductAttention_0/query/bias"] == (h, w // h)
    assert flat[blk + "0/MultiHeadDotProductAttention_0/out/kernel"] == (h, w // h, w)
    assert flat[blk + "0/MlpBlock_0/Dense_0/kernel"] == (w, f)
    assert flat[blk + "1/MlpBlock_0/router/w/kernel"] == (w, e)
    assert flat[blk + "1/MlpBlock_0/expert/Dense_0/kernel"] == (e, w, f)
    assert flat[blk + "1/MlpBlock_0/expert/Dense_0/bias"] == (e, f)
    assert flat[blk + "1/MlpBlock_0/expert/Dense_1/bias"] == (e, w)
    assert flat["head/kernel"] == (w, 5)
    gap = vit.abstract_params(dataclasses.replace(config, pool_type="gap"))
    assert "cls" not in gap


def test_named_configs():
    # timm's published parameter counts, less one [cls] position row (big_vision has none).
    timm = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632}
    for name, count in timm.items():
        cfg = vit.config(name)
        assert vit.num_params(cfg) == count - cfg.width, name
    b = vit.config("B/16")
    assert (b.width, b.depth, b.mlp_dim, b.num_heads, b.image_size) == (
        768,
        12,
        3072,
        12,
        (224, 224),
    )
    assert (b.moe.router, b.moe.capacity_factor, b.moe.normalize_combine_weights) == (
        "expert_choice",
        2.0,
        True,
    )
    small = vit.config("Ti/4-28")
    assert (small.patch_size, small.image_size, small.num_channels) == ((4, 4), (28, 28), 1)
    assert (small.num_classes, small.num_patches, small.width) == (10, 49, 192)
    assert vit.config("S/7-28", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="unknown ViT config"):
        vit.config("X/16")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        vit.config("tiny", num_heads=3)
