"""``config_to_hf`` for HF T5 and ViT: round trips through ``config_from_hf``, what HF's own
config classes make of the dict (checked against HF's semantics), tiny HF models whose state
dicts ``from_hf`` accepts, and the refusals."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sparse_upcycle.checkpoints import hf_t5, hf_vit
from sparse_upcycle.models import t5, vit
from sparse_upcycle.models.moe_config import MoeConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ACT2FN = transformers.activations.ACT2FN

X = torch.linspace(-5.0, 5.0, 201)
GELU_EXACT = torch.nn.functional.gelu(X)
GELU_TANH = torch.nn.functional.gelu(X, approximate="tanh")


def _close(act_name: str, ref: torch.Tensor) -> bool:
    return bool(torch.allclose(ACT2FN[act_name](X), ref, atol=1e-5))


def _numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _json(d: dict) -> dict:
    """What a config.json round trip gives (also proves the dict is JSON-able)."""
    return json.loads(json.dumps(d))


# --------------------------------------------------------------------------------------------
# T5.
# --------------------------------------------------------------------------------------------

T5_SMALL = dict(
    vocab_size=40,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=24,
    num_encoder_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)
T5_V1_1 = t5.T5Config(**T5_SMALL, mlp_activations=("gelu", "linear"), logits_via_embedding=False)
T5_V1_0 = t5.T5Config(
    **T5_SMALL,
    mlp_activations=("relu",),
    logits_via_embedding=True,
    dropout_rate=0.1,
    layer_norm_eps=1e-5,
)
T5_CASES = {
    "v1_1_gated_gelu_untied": T5_V1_1,
    "v1_0_relu_tied": T5_V1_0,
    "gated_gelu_exact": dataclasses.replace(T5_V1_1, mlp_activations=("gelu_exact", "linear")),
    "gelu_exact": dataclasses.replace(T5_V1_0, mlp_activations=("gelu_exact",)),
    "gelu_tanh": dataclasses.replace(T5_V1_0, mlp_activations=("gelu",)),
    "gated_silu": dataclasses.replace(T5_V1_1, mlp_activations=("silu", "linear")),
}
# HF's view of each case: feed_forward_proj, dense_act_fn, is_gated_act, reference activation.
T5_HF = {
    "v1_1_gated_gelu_untied": ("gated-gelu", "gelu_new", True, GELU_TANH),
    "v1_0_relu_tied": ("relu", "relu", False, torch.relu(X)),
    "gated_gelu_exact": ("gated-gelu_python", "gelu_python", True, GELU_EXACT),
    "gelu_exact": ("gelu", "gelu", False, GELU_EXACT),
    "gelu_tanh": ("gelu_new", "gelu_new", False, GELU_TANH),
    "gated_silu": ("gated-silu", "silu", True, torch.nn.functional.silu(X)),
}


@pytest.mark.parametrize("name", sorted(T5_CASES))
def test_t5_round_trip_and_hf_semantics(name):
    cfg = T5_CASES[name]
    assert cfg.dtype == "float32"
    d = hf_t5.config_to_hf(cfg)
    assert _json(d) == d
    assert d["model_type"] == "t5" and d["architectures"] == ["T5ForConditionalGeneration"]
    assert hf_t5.config_from_hf(d) == cfg
    assert hf_t5.config_from_hf(_json(d)) == cfg

    hf = transformers.T5Config(**d)
    proj, act_fn, gated, ref = T5_HF[name]
    assert (hf.feed_forward_proj, hf.dense_act_fn, hf.is_gated_act) == (proj, act_fn, gated)
    assert _close(hf.dense_act_fn, ref)  # HF applies the same activation as our model
    assert (hf.d_model, hf.d_kv, hf.d_ff, hf.num_heads) == (16, 8, 24, 2)
    assert (hf.num_layers, hf.num_decoder_layers, hf.vocab_size) == (2, 3, 40)
    assert (hf.relative_attention_num_buckets, hf.relative_attention_max_distance) == (8, 20)
    assert hf.dropout_rate == cfg.dropout_rate and hf.layer_norm_epsilon == cfg.layer_norm_eps
    assert hf.decoder_start_token_id == 0 and hf.pad_token_id == 0
    # v1.0 (tied) scales the decoder output by d_model**-0.5 before the head; v1.1 does not.
    assert hf.scale_decoder_outputs is cfg.logits_via_embedding
    assert hf.tie_word_embeddings is True  # transformers 5.x forces it, whatever d says
    # HF's own dict (what save_pretrained writes) reads back as the same config.
    assert hf_t5.config_from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", ["v1_1_gated_gelu_untied", "v1_0_relu_tied"])
def test_t5_hf_model_state_dict_fits_from_hf(name):
    cfg = T5_CASES[name]
    d = hf_t5.config_to_hf(cfg)
    hf_cfg = transformers.T5Config(**d)
    if not cfg.logits_via_embedding:
        hf_cfg.tie_word_embeddings = False  # building (not loading) an untied 5.x model
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert tied is cfg.logits_via_embedding
    sd = _numpy_state_dict(model)
    if not cfg.logits_via_embedding:  # untying also untied the input embeddings
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            sd[key] = sd["shared.weight"]
    params = hf_t5.from_hf(sd, hf_t5.config_from_hf(d))
    want = jax.tree.map(lambda a: a.shape, t5.abstract_params(cfg))
    assert jax.tree.map(lambda a: a.shape, params) == want


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_t5_from_pretrained_keeps_the_head(tmp_path, tied):
    """The export path: config_to_hf's config.json + to_hf's safetensors -> from_pretrained."""
    from safetensors.numpy import save_file

    cfg = T5_V1_0 if tied else T5_V1_1
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32), t5.abstract_params(cfg)
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_t5.config_to_hf(cfg)))
    save_file(hf_t5.to_hf(params, cfg), str(tmp_path / "model.safetensors"))
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path))
    embedding = params["token_embedder"]["embedding"]
    np.testing.assert_array_equal(model.shared.weight.detach().numpy(), embedding)
    head = embedding if tied else params["decoder"]["logits_dense"]["kernel"].T
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), head)
    assert (model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()) is tied
    assert model.config.scale_decoder_outputs is tied


def test_t5_refusals():
    moe = MoeConfig(num_experts=4, layers=(1,))
    with pytest.raises(ValueError, match="HF T5 classes are dense.*export a dense model"):
        hf_t5.config_to_hf(dataclasses.replace(T5_V1_1, encoder_moe=moe))
    with pytest.raises(ValueError, match="HF T5 classes are dense"):
        hf_t5.config_to_hf(dataclasses.replace(T5_V1_1, decoder_moe=moe))
    for acts in [
        ("gelu", "linear", "linear"),
        ("gelu", "relu"),
        ("linear", "gelu"),
        ("linear",),
    ]:
        with pytest.raises(ValueError, match="no HF feed_forward_proj"):
            hf_t5.config_to_hf(dataclasses.replace(T5_V1_1, mlp_activations=acts))


# --------------------------------------------------------------------------------------------
# ViT.
# --------------------------------------------------------------------------------------------

VIT_SMALL = dict(
    patch_size=4,
    image_size=12,
    width=16,
    depth=2,
    mlp_dim=24,
    num_heads=2,
    num_channels=3,
    head_zeroinit=False,
)
VIT_CASES = {
    "classes_gelu_exact": vit.ViTConfig(
        **VIT_SMALL, num_classes=5, mlp_act="gelu_exact", layer_norm_eps=1e-12
    ),
    "classes_gelu_tanh": vit.ViTConfig(**VIT_SMALL, num_classes=3, mlp_act="gelu", dropout=0.1),
    "no_head": vit.ViTConfig(**VIT_SMALL, num_classes=0, mlp_act="gelu_exact"),
}


@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_vit_round_trip_and_hf_semantics(name):
    cfg = VIT_CASES[name]
    assert cfg.dtype == "float32"
    d = hf_vit.config_to_hf(cfg)
    assert _json(d) == d
    assert d["model_type"] == "vit"
    arch = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
    assert d["architectures"] == [arch]
    assert len(d["id2label"]) == d["num_labels"] == cfg.num_classes
    assert hf_vit.config_from_hf(d) == cfg
    assert hf_vit.config_from_hf(_json(d)) == cfg

    hf = transformers.ViTConfig(**d)
    assert (hf.hidden_size, hf.intermediate_size) == (16, 24)
    assert (hf.num_hidden_layers, hf.num_attention_heads) == (2, 2)
    assert (hf.image_size, hf.patch_size, hf.num_channels) == (12, 4, 3)
    assert hf.num_labels == cfg.num_classes and len(hf.id2label) == cfg.num_classes
    assert hf.layer_norm_eps == cfg.layer_norm_eps and hf.qkv_bias is True
    assert hf.hidden_dropout_prob == cfg.dropout and hf.attention_probs_dropout_prob == 0.0
    assert _close(hf.hidden_act, GELU_EXACT if cfg.mlp_act == "gelu_exact" else GELU_TANH)
    assert hf_vit.config_from_hf(hf.to_dict()) == cfg


def test_vit_head_zeroinit_is_not_exported():
    cfg = vit.ViTConfig(**{**VIT_SMALL, "head_zeroinit": True}, num_classes=2)
    back = hf_vit.config_from_hf(hf_vit.config_to_hf(cfg))
    assert back == dataclasses.replace(cfg, head_zeroinit=False)


@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_vit_hf_model_state_dict_fits_from_hf(name):
    cfg = VIT_CASES[name]
    d = hf_vit.config_to_hf(cfg)
    hf_cfg = transformers.ViTConfig(**d)
    torch.manual_seed(0)
    if cfg.num_classes:
        model = transformers.ViTForImageClassification(hf_cfg)
        assert model.classifier.out_features == cfg.num_classes
    else:
        model = transformers.ViTModel(hf_cfg)
    params = hf_vit.from_hf(_numpy_state_dict(model), hf_vit.config_from_hf(d))
    want = jax.tree.map(lambda a: a.shape, vit.abstract_params(cfg))
    assert jax.tree.map(lambda a: a.shape, params) == want


def test_vit_refusals():
    base = VIT_CASES["classes_gelu_exact"]
    moe = dataclasses.replace(base.moe, num_experts=4)
    with pytest.raises(ValueError, match="HF ViT classes are dense.*export a dense model"):
        hf_vit.config_to_hf(dataclasses.replace(base, moe=moe))
    with pytest.raises(ValueError, match="pool_type='tok'"):
        hf_vit.config_to_hf(dataclasses.replace(base, pool_type="gap"))
    sincos = dataclasses.replace(base)
    object.__setattr__(sincos, "posemb", "sincos2d")  # not a ViTConfig option (yet)
    with pytest.raises(ValueError, match="learned position embeddings"):
        hf_vit.config_to_hf(sincos)
    with pytest.raises(ValueError, match="square patch_size"):
        hf_vit.config_to_hf(dataclasses.replace(base, patch_size=(4, 2)))
    with pytest.raises(ValueError, match="square image_size"):
        hf_vit.config_to_hf(dataclasses.replace(base, image_size=(12, 8)))
    with pytest.raises(ValueError, match="no HF hidden_act"):
        hf_vit.config_to_hf(dataclasses.replace(base, mlp_act="linear"))
