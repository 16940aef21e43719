"""``export`` round trips and dense exports, against HF transformers (T5, ViT, Llama).

* HF → ``export --format orbax`` → ``export --format hf``: the same tensor names, dtypes and
  bytes, and a byte-identical ``config.json`` (models written by ``save_pretrained``; also a
  sharded bfloat16 Llama and a headless ``ViTModel`` with its pooler).
* Our dense T5/ViT (random init, no HF source, model described by ``--config``) → HF: the HF
  class computes our logits; a ViT whose class token changed after import is written unfolded
  and still matches.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.cli import main
from sparse_upcycle.models import build_model

_TINY = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _save_t5(path, tied):
    kw = dict(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    if tied:
        cfg = transformers.T5Config(**kw)
    else:  # v1.1: gated GELU, untied head (transformers 5 needs the flag set afterwards)
        cfg = transformers.T5Config(
            **kw, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False
        )
        cfg.tie_word_embeddings = False
    model = transformers.T5ForConditionalGeneration(cfg)
    if not tied:  # T5X has one embedding table: the input embeddings equal `shared`
        with torch.no_grad():
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(path)


def _save_vit(path, head):
    cfg = transformers.ViTConfig(
        hidden_size=16, image_size=8, patch_size=4, **_TINY, **({"num_labels": 3} if head else {})
    )
    cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    model = cls(cfg)
    with torch.no_grad():  # HF initialises these to zeros and a constant: make them random
        model.state_dict()[("vit." if head else "") + "embeddings.cls_token"].normal_()
        model.state_dict()[("vit." if head else "") + "embeddings.position_embeddings"].normal_()
    model.save_pretrained(path)


def _save_llama(path, tied=False, dtype=torch.float32, shard=None):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        **_TINY,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))


SOURCES = {
    "t5_v11_untied": lambda p: _save_t5(p, tied=False),
    "t5_v10_tied": lambda p: _save_t5(p, tied=True),
    "vit_classifier": lambda p: _save_vit(p, head=True),
    "vit_model_with_pooler": lambda p: _save_vit(p, head=False),
    "llama_untied": lambda p: _save_llama(p),
    "llama_tied": lambda p: _save_llama(p, tied=True),
    "llama_bf16_sharded": lambda p: _save_llama(p, dtype=torch.bfloat16, shard="20KB"),
}


def _tensors(directory) -> dict[str, tuple[str, bytes]]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    out[key] = (str(t.dtype), t.view(torch.uint8).numpy().tobytes())
    return out


def _sha(directory) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(r, n), directory): hashlib.sha256(
            open(os.path.join(r, n), "rb").read()
        ).hexdigest()
        for r, _, names in os.walk(directory)
        for n in names
    }


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_hf_round_trip_is_bitwise(tmp_path, name):
    torch.manual_seed(0)
    src, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    SOURCES[name](str(src))
    before = _sha(src)
    assert main(["export", "--src", str(src), "--dst", str(ours), "--format", "orbax"]) == 0
    assert (ours / "hf_source" / "config.json").is_file()
    assert main(["export", "--src", str(ours), "--dst", str(back)]) == 0
    want, got = _tensors(src), _tensors(back)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key][0] == want[key][0], key  # dtype
        assert got[key][1] == want[key][1], key  # bytes
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
    if (src / "generation_config.json").exists():
        assert (back / "generation_config.json").read_bytes() == (
            src / "generation_config.json"
        ).read_bytes()
    assert _sha(src) == before  # the source is only read


def _write_config(tmp_path, family, overrides) -> str:
    path = tmp_path / f"{family}_cfg.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.model = ml_collections.ConfigDict({{'family': {family!r}, 'name': 'tiny', "
        f"'overrides': {overrides!r}}})\n"
        "    return c\n"
    )
    return str(path)


def _random_dense(family, cfg_overrides, tmp_path):
    from sparse_upcycle.models import t5, vit

    module = {"t5": t5, "vit": vit}[family]
    cfg = module.config("tiny", **cfg_overrides)
    cls = {"t5": t5.T5, "vit": vit.ViT}[family]
    model = cls(cfg, rngs=nnx.Rngs(3))
    flat = flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    if family == "vit":  # zero-initialised in big_vision: make them carry information
        rng = np.random.default_rng(0)
        for key in ("head/kernel", "head/bias", "cls"):
            flat[key] = rng.normal(size=flat[key].shape).astype(np.float32)
    npz = tmp_path / f"{family}.npz"
    np.savez(npz, **flat)
    return cfg, flat, str(npz)


def test_dense_t5_without_hf_source_matches_hf_t5(tmp_path):
    overrides = {"logits_via_embedding": False}
    cfg, flat, npz = _random_dense("t5", overrides, tmp_path)
    config = _write_config(tmp_path, "t5", overrides)
    out = tmp_path / "hf"
    assert main(["export", "--src", npz, "--config", config, "--dst", str(out)]) == 0
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
    rng = np.random.default_rng(1)
    enc = rng.integers(1, cfg.vocab_size, (2, 7))
    dec = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(1, cfg.vocab_size, (2, 4))], 1)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got, _ = build_model("t5", cfg, flat)(jnp.asarray(enc), jnp.asarray(dec), train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("train_cls", [False, True])
def test_dense_vit_without_hf_source_matches_hf_vit(tmp_path, train_cls):
    overrides = {"pool_type": "tok", "head_zeroinit": False, "mlp_act": "gelu_exact"}
    cfg, flat, npz = _random_dense("vit", overrides, tmp_path)
    config = _write_config(tmp_path, "vit", overrides)
    src = npz
    if train_cls:  # through our format with an HF-like source, then the class token changes
        hf_dir, ours = tmp_path / "hf0", tmp_path / "ours"
        assert main(["export", "--src", npz, "--config", config, "--dst", str(hf_dir)]) == 0
        assert main(["export", "--src", str(hf_dir), "--dst", str(ours), "--format", "orbax"]) == 0
        from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint, write_orbax

        ckpt = OrbaxCheckpoint(str(ours / "checkpoint"))
        flat = {k: ckpt.read(k) for k in ckpt.keys()}
        flat["cls"] = flat["cls"] + 0.5  # "trained" after the import
        write_orbax(str(ours / "checkpoint2"), flat, step=0)
        os.rename(ours / "checkpoint", ours / "checkpoint_old")
        os.rename(ours / "checkpoint2", ours / "checkpoint")
        src = str(ours)
    out = tmp_path / "hf"
    args = ["export", "--src", src, "--dst", str(out)]
    assert main(args + ([] if train_cls else ["--config", config])) == 0
    hf = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    h, w = cfg.image_size
    images = np.random.default_rng(2).normal(size=(2, h, w, cfg.num_channels)).astype(np.float32)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).logits.numpy()
    got, _ = build_model("vit", cfg, flat)(jnp.asarray(images), train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    if train_cls:  # unfolded: the class token carries the sum, its position is zero
        with safe_open(str(out / "model.safetensors"), framework="np") as f:
            np.testing.assert_array_equal(f.get_tensor("vit.embeddings.cls_token"), flat["cls"])
            assert not f.get_tensor("vit.embeddings.position_embeddings")[:, 0].any()


def test_moe_t5_and_vit_are_refused(tmp_path, capsys):
    for family in ("vit", "t5"):
        cfg, flat, npz = _random_dense(family, {}, tmp_path)
        moe = tmp_path / f"{family}_moe"
        args = ["--config", "configs/upcycle_tiny.py:" + family]
        assert main(["upcycle", *args, "--src", npz, "--dst", str(moe)]) == 0
        capsys.readouterr()
        out = tmp_path / f"{family}_hf"
        assert main(["export", "--src", str(moe), "--dst", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "are dense" in err and "sparse-upcycle: error:" in err
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]


def test_orbax_export_of_an_hf_dir_is_an_init_source(tmp_path):
    """The --format orbax output is the layout `upcycle` writes: recipe.json names the model."""
    _save_llama(str(tmp_path / "hf"))
    ours = tmp_path / "ours"
    assert (
        main(["export", "--src", str(tmp_path / "hf"), "--dst", str(ours), "--format", "orbax"])
        == 0
    )
    info = json.loads((ours / "recipe.json").read_text())
    assert info["family"] == "decoder" and info["recipe"] is None
    assert info["model"]["num_key_value_heads"] == 1 and info["source"]["format"] == "hf"
