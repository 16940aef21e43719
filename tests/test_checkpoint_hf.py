"""Hugging Face safetensors reader on directories written by transformers' save_pretrained.

Each reader test builds a tiny random transformers model, saves it, reads it back with
``HFCheckpoint`` and compares every tensor with the model's own ``state_dict()`` through an
expected name/layout mapping written out here from the HF naming convention (torch
``nn.Linear`` stores ``weight`` as [out, in], our kernels are [in, out]); the mapping modules
(``checkpoints/hf_*.py``) are not used to compute the expectation. Dimensions are chosen
unequal where a transpose or a reshape could otherwise go unnoticed.
"""

import json

import numpy as np
import pytest
import torch
import transformers

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.hf import HFCheckpoint


class _StateDict:
    """A torch state dict as numpy arrays that records which names were taken."""

    def __init__(self, model):
        self.arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        self.taken: set[str] = set()

    def __call__(self, name):
        self.taken.add(name)
        return self.arrays[name]


def _assert_reads(ckpt, sd, want, unused=()):
    """``ckpt`` holds exactly the keys of ``want``, each equal (values and shape) to its expected
    array, and every state-dict tensor but ``unused`` went into some expected array."""
    assert ckpt.keys() == sorted(want)
    for key, value in want.items():
        got = ckpt.read(key)
        assert got.shape == value.shape, key
        np.testing.assert_array_equal(got, value, err_msg=key)
    assert sorted(set(sd.arrays) - sd.taken) == sorted(unused)


def _llama(tmp_path, shard=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    return model


def _llama_expected(sd, layers):
    """Our decoder paths from HF Llama names: Linear weights transposed, norms as they are (HF
    q/k already use the half-split rotary layout that our RoPE uses)."""
    want = {
        "token_embedder/embedding": sd("model.embed_tokens.weight"),
        "final_norm/scale": sd("model.norm.weight"),
        "logits_dense/kernel": sd("lm_head.weight").T,
    }
    for i in range(layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}/"
        want[ours + "pre_attention_norm/scale"] = sd(hf + "input_layernorm.weight")
        want[ours + "pre_mlp_norm/scale"] = sd(hf + "post_attention_layernorm.weight")
        for proj, name in [("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")]:
            want[ours + f"attention/{name}/kernel"] = sd(hf + f"self_attn.{proj}_proj.weight").T
        for proj, name in [("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")]:
            want[ours + f"mlp/{name}/kernel"] = sd(hf + f"mlp.{proj}_proj.weight").T
    return want


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_reads_single_and_sharded_llama(tmp_path, shard):
    model = _llama(tmp_path, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.model_family == "llama" and ckpt.config.num_key_value_heads == 2
    sd = _StateDict(model)
    want = _llama_expected(sd, model.config.num_hidden_layers)
    assert want["layers_0/attention/key/kernel"].shape == (32, 16)  # 2 kv heads of 8
    _assert_reads(ckpt, sd, want)
    np.testing.assert_array_equal(  # one name checked by hand: q_proj is transposed
        ckpt.read("layers_1/attention/query/kernel"),
        sd.arrays["model.layers.1.self_attn.q_proj.weight"].T,
    )


def test_reads_t5(tmp_path):
    """A T5 v1.1 (gated GELU, untied output layer, 3 encoder and 2 decoder blocks)."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=6,
        d_ff=40,
        num_layers=3,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # transformers 5.x: becomes scale_decoder_outputs=False
    )
    cfg.tie_word_embeddings = False  # transformers 5.x forces True in __post_init__
    model = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # untied, the stacks' input embeddings are separate: T5X has one
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(tmp_path)
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.model_family == "t5"

    sd = _StateDict(model)
    attn = [("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")]
    mlp = ["wi_0", "wi_1", "wo"]
    want = {
        "token_embedder/embedding": sd("shared.weight"),
        "encoder/encoder_norm/scale": sd("encoder.final_layer_norm.weight"),
        "decoder/decoder_norm/scale": sd("decoder.final_layer_norm.weight"),
        "decoder/logits_dense/kernel": sd("lm_head.weight").T,
    }
    for stack in ("encoder", "decoder"):  # one relative-position table per stack, [H, buckets]
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        want[f"{stack}/relpos_bias/rel_embedding"] = sd(bias).T
    # Per block, HF's sub-layers in order: (our norm before it, HF attention module and ours),
    # the last one being the MLP (no attention module).
    mlp_sublayer = ("pre_mlp_layer_norm", None, None)
    sublayers = {
        "encoder": [("pre_attention_layer_norm", "SelfAttention", "attention"), mlp_sublayer],
        "decoder": [
            ("pre_self_attention_layer_norm", "SelfAttention", "self_attention"),
            ("pre_cross_attention_layer_norm", "EncDecAttention", "encoder_decoder_attention"),
            mlp_sublayer,
        ],
    }
    blocks = {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers}
    for stack in ("encoder", "decoder"):
        for i in range(blocks[stack]):
            ours = f"{stack}/layers_{i}/"
            for j, (norm, hf_module, module) in enumerate(sublayers[stack]):
                hf = f"{stack}.block.{i}.layer.{j}."
                want[ours + f"{norm}/scale"] = sd(hf + "layer_norm.weight")
                if hf_module is None:
                    for w in mlp:
                        want[ours + f"mlp/{w}/kernel"] = sd(hf + f"DenseReluDense.{w}.weight").T
                else:
                    for p, n in attn:
                        want[ours + f"{module}/{n}/kernel"] = sd(hf + f"{hf_module}.{p}.weight").T
    assert want["encoder/layers_0/attention/query/kernel"].shape == (16, 24)  # [d, H·Dkv]
    _assert_reads(
        ckpt, sd, want, unused=["decoder.embed_tokens.weight", "encoder.embed_tokens.weight"]
    )
    for stack in ("encoder", "decoder"):  # equal to shared.weight, so nothing is lost
        np.testing.assert_array_equal(sd(f"{stack}.embed_tokens.weight"), sd("shared.weight"))


def test_reads_vit(tmp_path):
    """A ViTForImageClassification: 3 channels, 8×8 images in 4×4 patches, 5 classes."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        num_labels=5,
    )
    model = transformers.ViTForImageClassification(cfg)
    model.save_pretrained(tmp_path)
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.model_family == "vit"

    sd = _StateDict(model)
    w, h = cfg.hidden_size, cfg.num_attention_heads
    d = w // h
    pos = sd("vit.embeddings.position_embeddings")  # [1, 1 + N, w], the class position first
    want = {
        # conv weight [w, c, p, p] -> our [p, p, c, w]
        "embedding/kernel": sd("vit.embeddings.patch_embeddings.projection.weight").transpose(
            2, 3, 1, 0
        ),
        "embedding/bias": sd("vit.embeddings.patch_embeddings.projection.bias"),
        # HF adds the class position to the class token after prepending it; we fold it in.
        "cls": sd("vit.embeddings.cls_token") + pos[:, :1],
        "pos_embedding": pos[:, 1:],
        "Transformer/encoder_norm/scale": sd("vit.layernorm.weight"),
        "Transformer/encoder_norm/bias": sd("vit.layernorm.bias"),
        "head/kernel": sd("classifier.weight").T,
        "head/bias": sd("classifier.bias"),
    }
    for i in range(cfg.num_hidden_layers):
        # transformers 5.x names in memory (the files keep the older names)
        hf, ours = f"vit.layers.{i}.", f"Transformer/encoderblock_{i}/"
        for norm, name in [("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_1")]:
            want[ours + f"{name}/scale"] = sd(hf + f"{norm}.weight")
            want[ours + f"{name}/bias"] = sd(hf + f"{norm}.bias")
        mha = ours + "MultiHeadDotProductAttention_0/"
        for p, name in [("q", "query"), ("k", "key"), ("v", "value")]:
            want[mha + f"{name}/kernel"] = sd(hf + f"attention.{p}_proj.weight").T.reshape(w, h, d)
            want[mha + f"{name}/bias"] = sd(hf + f"attention.{p}_proj.bias").reshape(h, d)
        want[mha + "out/kernel"] = sd(hf + "attention.o_proj.weight").T.reshape(h, d, w)
        want[mha + "out/bias"] = sd(hf + "attention.o_proj.bias")
        for fc, name in [("fc1", "Dense_0"), ("fc2", "Dense_1")]:
            want[ours + f"MlpBlock_0/{name}/kernel"] = sd(hf + f"mlp.{fc}.weight").T
            want[ours + f"MlpBlock_0/{name}/bias"] = sd(hf + f"mlp.{fc}.bias")
    assert want["embedding/kernel"].shape == (4, 4, 3, 24)
    _assert_reads(ckpt, sd, want)


def test_refuses_pickle_and_broken_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="never does; convert it to safetensors"):
        HFCheckpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not supported"):
        HFCheckpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(str(tmp_path / "nowhere"))
