"""Dense Qwen2 / Qwen3 (and Llama with ``attention_bias``) in and out of the decoder family.

The independent reference is HF transformers' torch implementation on CPU
(``Qwen2ForCausalLM``: q/k/v biases, no o bias; ``Qwen3ForCausalLM``: per-head q/k RMSNorm
before RoPE, explicit ``head_dim``, optional ``attention_bias`` on all four projections).
Tiny random models are built once per module; their weights are O(1) so that a 1e-4 bound
on the logits is a real one.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints import hf_llama
from sparse_upcycle.models import decoder as dec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 96
UPCYCLE_TINY = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "upcycle_tiny.py")
# 1e-4 abs on O(1) fp32 logits: torch and XLA order the sums differently (observed ~1e-6).
ATOL = 1e-4

_forward = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw))

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    rope_theta=1000.0,  # not the default, so a theta mix-up shows
    max_position_embeddings=64,
    attn_implementation="eager",
)
# name -> (HF class names, config kwargs, expected (attention_bias, attention_out_bias,
# qk_norm, model_type, head_dim) of our config)
CASES = {
    # head_dim 16 != hidden/heads = 8 (Qwen2 reads it with getattr); tied, as Qwen2-0.5B.
    "qwen2": (
        ("Qwen2Config", "Qwen2ForCausalLM"),
        dict(head_dim=16, tie_word_embeddings=True, sliding_window=4096),
        (True, False, False, "qwen2", 16),
    ),
    "qwen3": (
        ("Qwen3Config", "Qwen3ForCausalLM"),
        dict(head_dim=16, tie_word_embeddings=False, attention_bias=False),
        (False, False, True, "qwen3", 16),
    ),
    "qwen3-bias": (
        ("Qwen3Config", "Qwen3ForCausalLM"),
        dict(head_dim=8, tie_word_embeddings=False, attention_bias=True),
        (True, True, True, "qwen3", 8),
    ),
    "llama-bias": (
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(tie_word_embeddings=False, attention_bias=True),
        (True, True, False, "llama", 8),
    ),
}


def _randomize(hf_model, seed=0):
    """O(1) weights and biases, norm scales (q/k norms too) away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _build(name):
    (config_cls, model_cls), kw, _ = CASES[name]
    hf_cfg = getattr(transformers, config_cls)(**_COMMON, **kw)
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    _randomize(model)
    return model


def _state_dict(hf_model):
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def _hf_logits(hf_model, tokens, mask):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            use_cache=False,
        )
    return out.logits.float().numpy()


def _ours(cfg, params):
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def batch():
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 11)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = False  # left padding in row 1
    return tokens, mask


@pytest.fixture(scope="module")
def built(batch):
    """name -> (HF model, its state dict, our config, our params, HF logits on ``batch``)."""
    out = {}
    for name in CASES:
        hf_model = _build(name)
        sd = _state_dict(hf_model)
        cfg = hf_llama.config_from_hf(hf_model.config.to_dict())
        params = hf_llama.from_hf(sd, cfg)
        out[name] = (hf_model, sd, cfg, params, _hf_logits(hf_model, *batch))
    return out


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------------------------
# 1. Logits parity and exact round trips.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(name, built, batch):
    hf_model, sd, cfg, params, want = built[name]
    bias, out_bias, qk_norm, model_type, head_dim = CASES[name][2]
    assert (cfg.attention_bias, cfg.attention_out_bias, cfg.qk_norm) == (bias, out_bias, qk_norm)
    assert (cfg.model_type, cfg.head_dim, cfg.rope_theta) == (model_type, head_dim, 1000.0)
    layer = params["layers_1"]["attention"]
    assert ("bias" in layer["query"], "bias" in layer["out"]) == (bias, out_bias)
    assert ("query_norm" in layer) == qk_norm == ("key_norm" in layer)
    if qk_norm:
        assert layer["key_norm"]["scale"].shape == (head_dim,)
        np.testing.assert_array_equal(
            layer["key_norm"]["scale"], sd["model.layers.1.self_attn.k_norm.weight"]
        )
    if bias:  # biases are not transposed
        np.testing.assert_array_equal(
            layer["value"]["bias"], sd["model.layers.1.self_attn.v_proj.bias"]
        )

    tokens, mask = batch
    got, aux = _forward(_ours(cfg, params), jnp.asarray(tokens), token_mask=jnp.asarray(mask))
    assert aux == {}
    assert np.abs(want).std() > 0.5  # O(1) logits
    # Padding query rows are garbage in both implementations; compare real tokens only.
    diff = _max_abs(np.asarray(got)[mask], want[mask])
    print(f"{name}: max |ours - HF| logits = {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_to_hf_loads_in_transformers_with_equal_logits(name, built, batch, tmp_path):
    """ours -> to_hf + config_to_hf -> from_pretrained (no missing or unexpected tensor) ->
    the same logits as the source model."""
    hf_model, sd, cfg, params, want = built[name]
    back = hf_llama.to_hf(params, cfg)
    expected = {
        k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    assert sorted(back) == sorted(expected)
    assert all(np.array_equal(back[k], v) for k, v in expected.items())

    hf_json = hf_llama.config_to_hf(cfg)
    assert hf_json["model_type"] == cfg.model_type
    assert hf_json["architectures"] == [CASES[name][0][1]]
    assert hf_llama.config_from_hf(hf_json) == cfg
    assert hf_llama.config_from_hf(hf_json).model_type == cfg.model_type
    (tmp_path / "config.json").write_text(json.dumps(hf_json))
    safetensors_torch.save_file(
        {k: torch.from_numpy(v) for k, v in back.items()},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(loaded).__name__ == CASES[name][0][1]
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # And a strict load_state_dict into the class config_to_hf names (the tied head given as
    # the embedding, which is what tying means).
    strict = type(loaded)(loaded.config).eval()
    full = {k: torch.from_numpy(v) for k, v in back.items()}
    if cfg.tie_word_embeddings:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    strict.load_state_dict(full, strict=True)
    mask = batch[1]
    for label, model in (("from_pretrained", loaded.eval()), ("strict", strict)):
        diff = _max_abs(_hf_logits(model, *batch)[mask], want[mask])
        print(f"{name}: max |{label} reload - source HF| logits = {diff:.2e}")
        assert diff <= 1e-6  # the same torch model with the same weights


def test_cached_decoding_with_biases_and_qk_norm(built):
    """The KV cache holds keys after the q/k norm and RoPE: chunked decoding == full forward."""
    _, _, cfg, params, _ = built["qwen3-bias"]
    model = _ours(cfg, params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 7)), jnp.int32)
    full, _ = _forward(model, tokens)
    extend = nnx.jit(lambda m, t, c: m.extend(t, c))
    cache = model.init_cache(2, 8)
    pieces = []
    for lo, hi in [(0, 4), (4, 5), (5, 7)]:
        logits, cache = extend(model, tokens[:, lo:hi], cache)
        pieces.append(logits)
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------------------------
# 2. What config_from_hf / config_to_hf refuse.
# --------------------------------------------------------------------------------------------


def _qwen2_json(**changes):
    d = transformers.Qwen2Config(**{**_COMMON, "head_dim": 16}).to_dict()
    return {**d, **changes}


def test_sliding_window_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^use_sliding_window=True .*not implemented") as e:
        hf_llama.config_from_hf(_qwen2_json(use_sliding_window=True))
    assert "\n" not in str(e.value)
    hf = transformers.Qwen3Config(**_COMMON, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(ValueError, match=r"^use_sliding_window=True"):
        hf_llama.config_from_hf(hf.to_dict())
    with pytest.raises(ValueError, match=r"^layer_types \['sliding_attention'\]"):
        hf_llama.config_from_hf(_qwen2_json(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match=r"^config\.json: use_sliding_window must be true or"):
        hf_llama.config_from_hf(_qwen2_json(use_sliding_window="no"))
    # A window size without use_sliding_window is ignored by HF, and here.
    cfg = hf_llama.config_from_hf(_qwen2_json(sliding_window=32, use_sliding_window=False))
    assert cfg.model_type == "qwen2" and cfg.attention_bias and not cfg.attention_out_bias


def test_hf_class_defaults_per_family():
    """Without head_dim, Qwen3 means 128 (Qwen3Config's default), Qwen2 hidden/heads; Qwen2's
    q/k/v biases do not depend on attention_bias, which its attention ignores."""
    minimal = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64)
    minimal.update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    q3 = hf_llama.config_from_hf({"model_type": "qwen3", **minimal})
    q2 = hf_llama.config_from_hf({"model_type": "qwen2", "attention_bias": False, **minimal})
    assert (q3.head_dim, q2.head_dim) == (128, 32)
    assert transformers.Qwen3Config(**minimal).head_dim == 128
    hf_q2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**minimal))
    assert hf_q2.model.layers[0].self_attn.head_dim == 32
    assert hf_q2.model.layers[0].self_attn.o_proj.bias is None
    assert hf_q2.model.layers[0].self_attn.q_proj.bias is not None
    assert q2.attention_bias and not q2.attention_out_bias and not q2.qk_norm
    assert q3.qk_norm and not q3.attention_bias and q3.rms_norm_eps == 1e-6
    # Llama's MLP biases are still refused (the decoder's MLPs have none).
    llama = hf_llama.config_to_hf(dec.config("tiny"))
    with pytest.raises(ValueError, match=r"^mlp_bias=True is not supported"):
        hf_llama.config_from_hf({**llama, "mlp_bias": True})


def test_config_to_hf_refuses_what_the_family_cannot_hold():
    with pytest.raises(
        ValueError,
        match=r"^no HF llama equivalent: HF Llama has no q/k norms.*"
        r"set model_type='qwen3'",
    ):
        hf_llama.config_to_hf(dec.config("tiny", qk_norm=True))
    with pytest.raises(
        ValueError,
        match=r"HF Llama has attention biases on q/k/v and o, or on "
        r"none.*set model_type='qwen2'",
    ):
        hf_llama.config_to_hf(dec.config("tiny", attention_bias=True))
    with pytest.raises(ValueError, match=r"no HF family has this attention"):
        hf_llama.config_to_hf(
            dec.config("tiny", attention_out_bias=True, model_type="qwen3", qk_norm=True)
        )
    with pytest.raises(ValueError, match="model_type must be one of"):
        dec.config("tiny", model_type="gpt2")
    # An MoE of a Qwen2 is not a Mixtral (its attention has biases) but a Qwen2-MoE; labelled
    # llama, Mixtral refuses it and names the class that holds it.
    moe = dec.config(
        "llama-moe-8x-top2-tiny", attention_bias=True, model_type="qwen2", moe={"layers": "all"}
    )
    assert hf_llama.config_to_hf(moe)["architectures"] == ["Qwen2MoeForCausalLM"]
    with pytest.raises(
        ValueError,
        match=r"Mixtral's attention has no biases.*attention_bias.*"
        r"HF Qwen2-MoE would hold it: set model_type='qwen2'",
    ):
        hf_llama.config_to_hf(dataclasses.replace(moe, model_type="llama"))
    # model_type does not change the function: config equality ignores it.
    assert dec.config("tiny", model_type="qwen3") == dec.config("tiny")


# --------------------------------------------------------------------------------------------
# 3. The command line on save_pretrained directories.
# --------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """name -> a save_pretrained directory of the Qwen2 / Qwen3 models."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for name in ("qwen2", "qwen3"):
        built[name][0].save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_upcycle_copy_and_verify_preserve_the_dense_function(name, saved, tmp_path, capsys):
    src, dst = saved[name], tmp_path / "moe"
    config = f"{UPCYCLE_TINY}:decoder"
    flags = ["--config.model.name=checkpoint"]
    rc, _, err = _run(capsys, "upcycle", "--config", config, "--src", src, "--dst", dst, *flags)
    assert rc == 0, err
    recipe = json.load(open(dst / "recipe.json"))
    assert recipe["model"]["model_type"] == name and recipe["model"]["qk_norm"] == (name == "qwen3")
    rc, out, err = _run(capsys, "verify", "--config", config, "--dense", src, "--moe", dst, *flags)
    assert rc == 0, err
    result = json.loads(out)
    assert result["meant_to_preserve"] and result["ok"] and result["max_abs_delta"] < 1e-4
    # The MoE exports as the MoE class of its family (tests/test_export_qwen_moe.py has more).
    rc, _, err = _run(capsys, "export", "--src", dst, "--dst", tmp_path / "hf")
    assert rc == 0, err
    hf_json = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_json["model_type"] == f"{name}_moe"


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_dense_export_round_trip_writes_the_family_back(
    name, saved, built, batch, tmp_path, capsys
):
    """HF dir -> our layout (export --format orbax) -> export --format hf -> the same model
    type, architecture and logits in transformers."""
    ours, out = tmp_path / "ours", tmp_path / "hf"
    rc, _, err = _run(capsys, "export", "--src", saved[name], "--dst", ours, "--format", "orbax")
    assert rc == 0, err
    assert json.load(open(ours / "recipe.json"))["model"]["model_type"] == name
    rc, _, err = _run(capsys, "export", "--src", ours, "--dst", out)
    assert rc == 0, err
    hf_json = json.load(open(out / "config.json"))
    assert hf_json["model_type"] == name and hf_json["architectures"] == [CASES[name][0][1]]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(loaded).__name__ == CASES[name][0][1]
    got = _hf_logits(loaded.eval(), *batch)
    want = built[name][4]
    assert _max_abs(got[batch[1]], want[batch[1]]) <= 1e-6


def test_a_sliding_window_checkpoint_is_refused_by_the_cli(saved, tmp_path, capsys):
    src = tmp_path / "sliding"
    src.mkdir()
    for f in os.listdir(saved["qwen2"]):
        (src / f).write_bytes((saved["qwen2"] / f).read_bytes())
    hf_json = json.load(open(src / "config.json"))
    (src / "config.json").write_text(json.dumps({**hf_json, "use_sliding_window": True}))
    config = f"{UPCYCLE_TINY}:decoder"
    rc, _, err = _run(
        capsys,
        "upcycle",
        "--config",
        config,
        "--src",
        src,
        "--dst",
        tmp_path / "moe",
        "--config.model.name=checkpoint",
    )
    assert rc == 2 and "use_sliding_window=True" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists()
