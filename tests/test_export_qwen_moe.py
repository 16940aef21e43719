"""Qwen2-MoE / Qwen3-MoE: ``sparse-upcycle export`` to ``Qwen2MoeForCausalLM`` /
``Qwen3MoeForCausalLM`` and those classes read back (``checkpoints/hf_qwen_moe.py``).

The independent reference is HF transformers' torch implementation on CPU. Tiny random dense
Qwen2 / Qwen3 models (4 layers, d=32, f=64, O(1) weights so that a 1e-4 bound on O(1) logits
is a real one) are upcycled with ``configs/llama_moe_8x_top2.py`` (every other layer, 4
experts, top-2 whose weights sum to one, dropless): ``copy`` into Qwen3-MoE, and
``fine_grained_shared`` (4 routed experts of f/4 and 2 shared ones, Qwen2-MoE's gate) into
Qwen2-MoE, which compute the dense function; after 20 training steps the exports compute
what our model computes. Random HF Qwen MoEs read into our decoder give HF's logits and
round-trip bit for bit.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import models, surgeon
from sparse_upcycle.checkpoints import hf_llama
from sparse_upcycle.checkpoints.layout import config_from_dict
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.cli import main
from sparse_upcycle.models import decoder as dec
from sparse_upcycle.upcycle import methods

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "llama_moe_8x_top2.py")
VOCAB = 96
# 1e-4 abs on O(1) fp32 logits: torch and XLA order the sums differently (observed ~5e-6).
ATOL = 1e-4
HAS_FGS = "fine_grained_shared" in methods.METHODS
needs_fgs = pytest.mark.skipif(not HAS_FGS, reason="upcycle method fine_grained_shared missing")

_DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=1000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
_COMMON_FLAGS = ("--config.model.overrides.dtype=float32", "--config.model.moe.layers=every_other")
# name -> (dense source, upcycle flags, HF class, expected config.json fields)
UPCYCLES = {
    "qwen3_copy": (
        "qwen3",
        ("--config.upcycle.num_experts=4",),
        "Qwen3MoeForCausalLM",
        dict(moe_intermediate_size=64, num_experts=4, attention_bias=False),
    ),
    "qwen2_fgs": (
        "qwen2",
        (
            "--config.upcycle.method=fine_grained_shared",
            "--config.upcycle.num_experts=4",
            "--config.upcycle.shared_experts=2",
            "--config.upcycle.granularity=4",
            "--config.upcycle.renormalize=True",
            "--config.upcycle.scaling=exact",
            "--config.model.moe.renormalize=True",
            "--config.model.moe.shared_expert_gate=True",
        ),
        "Qwen2MoeForCausalLM",
        dict(moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=32),
    ),
    # copy fills no shared expert: Qwen2-MoE's is empty (f_s = 0), which adds exactly 0.
    "qwen2_copy": (
        "qwen2",
        ("--config.upcycle.num_experts=4",),
        "Qwen2MoeForCausalLM",
        dict(moe_intermediate_size=64, num_experts=4, shared_expert_intermediate_size=0),
    ),
}
_PARAMS = [pytest.param(n, marks=needs_fgs) if "fgs" in n else n for n in UPCYCLES]
TRAIN_FLAGS = (
    "--config.model.overrides.dtype=float32",
    "--config.data.name=synthetic",
    "--config.data.batch_size=8",
    "--config.data.seq_len=16",
    "--config.total_steps=20",
    "--config.mesh.expert=1",
    "--config.mesh.model=1",
    "--config.optimizer.learning_rate=0.02",
    "--config.optimizer.warmup_steps=2",
    "--config.checkpoint.every=20",
    "--config.eval_every=20",
    "--config.eval_steps=1",
)


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _randomize(hf_model, seed=0):
    """O(1) weights, norm scales away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _run(capsys, *argv):
    """``sparse-upcycle ARGV`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()


def _max_abs(a, b):
    assert np.shape(a) == np.shape(b)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _load(path):
    """transformers' AutoModelForCausalLM of ``path``, which must load every tensor exactly."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return model.eval()


def _assert_same_weights(a, b):
    """Two loaded HF models hold the same tensors, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _build(cfg, params):
    """Our decoder holding ``params`` (a pure nested dict)."""
    model = dec.Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def _logits(model, ids):
    logits, _ = model(jnp.asarray(ids.numpy()), train=False)
    return np.asarray(logits, np.float32)


def _trees_equal(a, b):
    """Same paths, bitwise equal leaves."""
    la, lb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    pairs = zip(la, lb, strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in pairs)


# --------------------------------------------------------------------------------------------
# Fixtures: the dense sources, their upcycles and exports, each built once.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen_moe")


@pytest.fixture(scope="module")
def dense(work):
    """family -> (dense HF model, its save_pretrained directory)."""
    out = {}
    for seed, family in enumerate(("qwen2", "qwen3")):
        name = family.capitalize()
        model = getattr(transformers, f"{name}ForCausalLM")(
            getattr(transformers, f"{name}Config")(**_DENSE, attn_implementation="eager")
        ).eval()
        _randomize(model, seed)
        model.save_pretrained(work / family)
        out[family] = (model, str(work / family))
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(np.random.default_rng(0).integers(3, VOCAB, (2, 12)))


@pytest.fixture(scope="module")
def upcycled(dense, work):
    """name -> the ``upcycle`` output of ``UPCYCLES[name]`` (made on first use)."""
    done = {}

    def get(name):
        if name not in done:
            family, flags, _, _ = UPCYCLES[name]
            dst = str(work / "moe" / name)
            argv = ["upcycle", "--config", CONFIG, "--src", dense[family][1], "--dst", dst]
            assert main([*argv, *_COMMON_FLAGS, *flags]) == 0
            info = json.load(open(os.path.join(dst, "recipe.json")))
            assert info["preserves_dense_function"], info
            done[name] = dst
        return done[name]

    return get


@pytest.fixture(scope="module")
def exported(upcycled, work):
    """name -> ``export --format hf`` of ``upcycled(name)`` (fused layout)."""
    done = {}

    def get(name):
        if name not in done:
            dst = str(work / "hf" / name)
            assert main(["export", "--src", upcycled(name), "--dst", dst]) == 0
            done[name] = dst
        return done[name]

    return get


def _our_logits(moe_dir, ids, flat=None):
    """Our decoder of the upcycled checkpoint at ``moe_dir`` (or its config with ``flat``)."""
    info, params = surgeon.load_upcycled(moe_dir)
    cfg = config_from_dict("decoder", info["model"])
    return _logits(models.build_model("decoder", cfg, params if flat is None else flat), ids)


# --------------------------------------------------------------------------------------------
# 1. Function-preserving upcycles export to the dense function.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _PARAMS)
def test_upcycle_exports_the_dense_function(name, dense, upcycled, exported, ids):
    family, _, cls, fields = UPCYCLES[name]
    out = exported(name)
    hf_json = json.load(open(os.path.join(out, "config.json")))
    assert hf_json["architectures"] == [cls] and hf_json["model_type"] == f"{family}_moe"
    assert (hf_json["decoder_sparse_step"], hf_json["mlp_only_layers"]) == (2, [])  # every other
    assert hf_json["norm_topk_prob"] is True and hf_json["num_experts_per_tok"] == 2
    assert hf_json["intermediate_size"] == 64  # the dense layers keep the dense width
    assert {k: hf_json[k] for k in fields} == fields
    model = _load(out)
    assert type(model).__name__ == cls
    layers = model.model.layers
    assert hasattr(layers[0].mlp, "gate_proj") and hasattr(layers[1].mlp, "experts")
    assert hasattr(layers[1].mlp, "shared_expert") == (family == "qwen2")
    got, want = _hf_logits(model, ids), _hf_logits(dense[family][0], ids)
    assert np.abs(want).std() > 0.3  # O(1) logits
    ours = _our_logits(upcycled(name), ids)
    to_dense, to_ours = _max_abs(got, want), _max_abs(got, ours)
    print(f"{name}: max |{cls} - dense HF| = {to_dense:.2e}, |{cls} - ours| = {to_ours:.2e}")
    assert to_dense <= ATOL and to_ours <= ATOL


@pytest.mark.parametrize("name", ["qwen3_copy", pytest.param("qwen2_fgs", marks=needs_fgs)])
def test_per_expert_layout_loads_the_same_model(name, upcycled, exported, work, ids):
    """``--moe-layout per_expert`` writes the on-disk names (``mlp.experts.{j}.gate_proj``),
    which transformers 5.x fuses when loading (conversion_mapping.py): the same model."""
    dst = str(work / "per_expert" / name)
    flags = ["--moe-layout", "per_expert", "--max-shard-size", "20KB"]
    assert main(["export", "--src", upcycled(name), "--dst", dst, *flags]) == 0
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"]
    assert "model.layers.3.mlp.experts.3.down_proj.weight" in index
    assert not any("gate_up_proj" in key for key in index)
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "float32"
    _assert_same_weights(_load(dst), _load(exported(name)))


@pytest.mark.parametrize("name", ["qwen3_copy", pytest.param("qwen2_fgs", marks=needs_fgs)])
def test_generate_matches_the_dense_model(name, dense, exported, ids):
    model = _load(exported(name))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        got = model.generate(ids, pad_token_id=0, **kw)
        want = dense[UPCYCLES[name][0]][0].generate(ids, pad_token_id=0, **kw)
    assert got.shape == (2, ids.shape[1] + 6)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


# --------------------------------------------------------------------------------------------
# 2. Trained MoEs (experts apart, routing matters) export to what our model computes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3_copy", pytest.param("qwen2_fgs", marks=needs_fgs)])
def test_trained_upcycle_exports_our_function(name, dense, upcycled, work, ids):
    family, flags, cls, _ = UPCYCLES[name]
    workdir = work / "train" / name
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir)]
    argv += ["--config.init_from=" + upcycled(name), *_COMMON_FLAGS, *flags, *TRAIN_FLAGS]
    assert main(argv) == 0
    step, out = str(workdir / "checkpoints" / "20"), str(work / "hf_trained" / name)
    export = ["export", "--src", step, "--config", CONFIG, *_COMMON_FLAGS, *flags, "--dst", out]
    assert main(export) == 0
    ckpt = OrbaxCheckpoint(step)
    flat = {k: ckpt.read(k) for k in ckpt.keys()}
    # Experts 0 and 2 started equal (copies; the same routed shard for E4S2G4) and drifted.
    w = flat["layers_1/mlp/expert/wi_0/kernel"]
    assert np.abs(w[0] - w[2]).max() > 1e-3
    ours = _our_logits(upcycled(name), ids, flat)
    model = _load(out)
    assert type(model).__name__ == cls
    got = _hf_logits(model, ids)
    to_ours, to_dense = _max_abs(got, ours), _max_abs(got, _hf_logits(dense[family][0], ids))
    print(f"{name} trained 20 steps: max |{cls} - ours| = {to_ours:.2e} (vs dense {to_dense:.2e})")
    assert to_ours <= ATOL
    assert to_dense > 1e-3  # it trained: not the dense model any more


def test_random_qwen2_moe_with_gated_shared_experts_exports_our_function(work, ids):
    """Our Qwen2-MoE-shaped decoder built directly (no upcycle): every parameter, router and
    gate included, moved by N(0, 0.2²) noise; sparse layers 1-3 (decoder_sparse_step=1,
    mlp_only_layers=[0]), top-2 of 8 softmax probabilities without renormalisation, two shared
    experts of width 16, tied embeddings. Fused and per-expert exports load in transformers
    and compute our logits; the map round-trips bit for bit."""
    moe = dict(
        num_experts=8,
        k=2,
        layers="last_n:3",
        ordering="softmax_then_topk",
        renormalize=False,
        expert_mlp_dim=16,
        num_shared_experts=2,
        shared_expert_mlp_dim=16,
        shared_expert_gate=True,
        router_z_loss_weight=0.0,
    )
    dims = {k: v for k, v in _DENSE.items() if k != "tie_word_embeddings"}
    cfg = dec.DecoderConfig(
        **dims, tie_word_embeddings=True, attention_bias=True, model_type="qwen2", moe=moe
    )
    params = nnx.to_pure_dict(nnx.state(dec.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda x: np.float32(np.asarray(x) + 0.2 * rng.standard_normal(np.shape(x))), params
    )
    hf_json = hf_llama.config_to_hf(cfg)
    assert (hf_json["decoder_sparse_step"], hf_json["mlp_only_layers"]) == (1, [0])
    assert hf_json["norm_topk_prob"] is False and hf_json["shared_expert_intermediate_size"] == 32
    back = hf_llama.config_from_hf(hf_json)
    assert back == dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, layers=(1, 2, 3)))
    ours = _logits(_build(cfg, params), ids)
    loaded = {}
    for layout in ("fused", "legacy"):
        sd = hf_llama.to_hf(params, cfg, moe_format=layout)
        assert _trees_equal(hf_llama.from_hf(sd, back), params)
        path = work / "random_qwen2_moe" / layout
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(hf_json))
        safetensors_torch.save_file(
            {k: torch.from_numpy(v) for k, v in sd.items()},
            str(path / "model.safetensors"),
            metadata={"format": "pt"},
        )
        loaded[layout] = _load(path)
    diff = _max_abs(_hf_logits(loaded["fused"], ids), ours)
    print(f"random Qwen2-MoE: max |HF - ours| = {diff:.2e}")
    assert np.abs(ours).std() > 0.3 and diff <= ATOL
    _assert_same_weights(loaded["legacy"], loaded["fused"])


# --------------------------------------------------------------------------------------------
# 3. HF Qwen2-MoE / Qwen3-MoE -> our decoder.
# --------------------------------------------------------------------------------------------

_HF_MOE = dict(
    {**_DENSE, "intermediate_size": 48},
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    attn_implementation="eager",
)
# name -> (HF class prefix, config kwargs, expected sparse layers, shared experts)
HF_CASES = {
    "qwen2_moe": (
        "Qwen2Moe",
        dict(decoder_sparse_step=2, shared_expert_intermediate_size=32, norm_topk_prob=False),
        (1, 3),
        2,
    ),
    "qwen2_moe-tied": (
        "Qwen2Moe",
        dict(
            mlp_only_layers=[0],
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
        (1, 2, 3),
        1,
    ),
    "qwen3_moe": ("Qwen3Moe", dict(mlp_only_layers=[1, 2], norm_topk_prob=True), (0, 3), 0),
    "qwen3_moe-bias": (
        "Qwen3Moe",
        dict(decoder_sparse_step=2, attention_bias=True, norm_topk_prob=False),
        (1, 3),
        0,
    ),
}


def _hf_moe(name):
    prefix, kw, _, _ = HF_CASES[name]
    config = getattr(transformers, f"{prefix}Config")(**{**_HF_MOE, **kw})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    _randomize(model, seed=3)
    return model


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_qwen_moe_reads_into_our_decoder(name, ids):
    hf_model = _hf_moe(name)
    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    cfg = hf_llama.config_from_hf(hf_model.config.to_dict())
    _, kw, sparse, shared = HF_CASES[name]
    m = cfg.moe
    assert cfg.model_type == name.split("_")[0] and cfg.sparse_layers == sparse
    assert (m.num_experts, m.k, m.expert_mlp_dim, m.num_shared_experts) == (8, 2, 16, shared)
    assert (m.ordering, m.renormalize) == ("softmax_then_topk", kw["norm_topk_prob"])
    assert m.shared_expert_gate == bool(shared) and m.capacity(train=False) is None
    params = hf_llama.from_hf(sd, cfg)
    got, want = _logits(_build(cfg, params), ids), _hf_logits(hf_model, ids)
    diff = _max_abs(got, want)
    print(f"{name}: max |ours - HF| logits = {diff:.2e}")
    assert np.abs(want).std() > 0.3 and diff <= ATOL
    # Bit for bit both ways (a tied head is the embedding, which save_pretrained leaves out).
    back = hf_llama.to_hf(params, cfg)
    expected = {
        k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    assert sorted(back) == sorted(expected)
    assert all(np.array_equal(back[k], v) for k, v in expected.items())
    assert _trees_equal(hf_llama.from_hf(back, cfg), params)
    hf_json = hf_llama.config_to_hf(cfg)
    assert hf_json["model_type"] == name.split("-")[0]
    assert hf_json["architectures"] == [type(hf_model).__name__]
    assert hf_llama.config_from_hf(json.loads(json.dumps(hf_json))) == cfg


def test_hf_qwen2_moe_directory_round_trips_through_our_layout(work, capsys, ids):
    """HF dir -> ``export --format orbax`` -> ``export --format hf --moe-layout per_expert``
    (the layout save_pretrained writes): the same tensors, bit for bit, and the same
    config.json but for ``torch_dtype``, which the per-expert layout adds for transformers 4.x
    (the model_type registration reaches the CLI)."""
    hf_model = _hf_moe("qwen2_moe")
    src, ours, out = work / "hf_src", work / "hf_src_ours", work / "hf_src_back"
    hf_model.save_pretrained(src)
    rc, _, err = _run(capsys, "export", "--src", src, "--dst", ours, "--format", "orbax")
    assert rc == 0, err
    rc, _, err = _run(capsys, "export", "--src", ours, "--dst", out, "--moe-layout", "per_expert")
    assert rc == 0, err
    got = json.load(open(out / "config.json"))
    assert got.pop("torch_dtype") == "float32"
    assert got == json.load(open(src / "config.json"))
    from safetensors.numpy import load_file

    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], v) for k, v in want.items())
    diff = _max_abs(_hf_logits(_load(out), ids), _hf_logits(hf_model, ids))
    assert diff <= 1e-6


# --------------------------------------------------------------------------------------------
# 4. Refusals: one line, naming the class that would hold the model if one does.
# --------------------------------------------------------------------------------------------

_ATTENTION = {
    "llama": {},
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm=True),
}


def _moe_config(model_type, attention=None, **moe):
    base = dict(
        num_experts=4,
        k=2,
        layers="every_other",
        ordering="softmax_then_topk",
        renormalize=True,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    return dec.config(
        "tiny",
        model_type=model_type,
        **_ATTENTION[attention or model_type],
        moe={**base, **moe},
    )


_GATED = dict(num_shared_experts=2, shared_expert_gate=True)
REFUSALS = {
    "sigmoid": (
        _moe_config("qwen3", score_function="sigmoid"),
        "Qwen3-MoE",
        "weights experts by softmax probabilities; this model scores them with sigmoid",
    ),
    "expert_bias": (
        _moe_config("qwen3", expert_bias=True),
        "Qwen3-MoE",
        "Qwen3-MoE's router has no selection bias",
    ),
    "capacity": (
        _moe_config("qwen2", eval_capacity_factor=1.0),
        "Qwen2-MoE",
        "Qwen2-MoE is dropless; in this model top_k routing at evaluation has",
    ),
    "ungated_shared": (
        _moe_config("qwen2", num_shared_experts=1),
        "Qwen2-MoE",
        "scales its shared expert by a sigmoid gate",
    ),
    "shared_into_qwen3": (
        _moe_config("qwen3", **_GATED),
        "Qwen3-MoE",
        "HF Qwen3-MoE has no shared experts; this model has 2 (moe.num_shared_experts)",
    ),
    "qwen2_attention_into_qwen3": (
        _moe_config("qwen3", "qwen2", **_GATED),
        "Qwen3-MoE",
        "has no shared experts; this model has 2 (moe.num_shared_experts) (HF Qwen2-MoE would "
        "hold it: set model_type='qwen2')",
    ),
    "shared_into_mixtral": (
        _moe_config("llama", "qwen2", layers="all", **_GATED),
        "Mixtral",
        "Mixtral has no shared experts; this model has 2 (moe.num_shared_experts) (HF Qwen2-MoE "
        "would hold it: set model_type='qwen2')",
    ),
    "qwen3_attention_into_qwen2": (
        _moe_config("qwen2", "qwen3"),
        "Qwen2-MoE",
        "HF Qwen2-MoE has biases on q/k/v, none on o and no q/k norms; this model has "
        "attention_bias=False, attention_out_bias=False, qk_norm=True (HF Qwen3-MoE would hold "
        "it: set model_type='qwen3')",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_config_to_hf_refuses_what_the_class_computes_differently(case):
    cfg, name, phrase = REFUSALS[case]
    with pytest.raises(ValueError, match=rf"^no HF {name} equivalent: ") as e:
        hf_llama.config_to_hf(cfg)
    message = str(e.value)
    print(message)
    assert phrase in message and "\n" not in message
    if case == "shared_into_qwen3":
        assert "would hold it" not in message  # Qwen2-MoE's attention is not Qwen3's
    if case == "capacity":  # --dropless: exported routing every token
        assert "Pass --dropless" in message
        assert hf_llama.config_to_hf(cfg, dropless=True)["model_type"] == "qwen2_moe"
    if case in ("shared_into_qwen3", "ungated_shared"):  # the tensor map refuses too
        params = nnx.to_pure_dict(nnx.state(dec.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        with pytest.raises(ValueError, match="shared expert"):
            hf_llama.to_hf(params, cfg)


def _assert_refused(capsys, src, dst, *phrases):
    rc, out, err = _run(capsys, "export", "--src", src, "--dst", dst)
    lines = err.strip().splitlines()
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("sparse-upcycle: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not os.path.exists(dst)
    return lines[0]


def test_cli_refuses_in_one_line_and_exit_code_2(dense, work, ids, capsys):
    # Capacity-limited evaluation routing: refused, then exported dropless with --dropless.
    src = str(work / "moe_capacity")
    argv = ["upcycle", "--config", CONFIG, "--src", dense["qwen3"][1], "--dst", src]
    flags = ("--config.upcycle.num_experts=4", "--config.model.moe.eval_capacity_factor=1.0")
    rc, _, err = _run(capsys, *argv, *_COMMON_FLAGS, *flags)
    assert rc == 0, err
    dst = str(work / "out_capacity")
    line = _assert_refused(capsys, src, dst, "no HF Qwen3-MoE equivalent", "Pass --dropless")
    print(line)
    rc, _, err = _run(capsys, "export", "--src", src, "--dst", dst, "--dropless")
    assert rc == 0, err
    model = _load(dst)
    assert _max_abs(_hf_logits(model, ids), _hf_logits(dense["qwen3"][0], ids)) <= ATOL
    # A Qwen2 attention said to be Qwen3's: Qwen3-MoE refuses it and names Qwen2-MoE.
    src = str(work / "moe_mislabelled")
    argv = ["upcycle", "--config", CONFIG, "--src", dense["qwen2"][1], "--dst", src]
    flags = ("--config.upcycle.num_experts=4", "--config.model.overrides.model_type=qwen3")
    rc, _, err = _run(capsys, *argv, *_COMMON_FLAGS, *flags)
    assert rc == 0, err
    line = _assert_refused(
        capsys,
        src,
        str(work / "out_mislabelled"),
        "no HF Qwen3-MoE equivalent: HF Qwen3-MoE has q/k norms",
        "(HF Qwen2-MoE would hold it: set model_type='qwen2')",
    )
    print(line)


_CONTINUE = """
from sparse_upcycle.train import default_config


def get_config(arg=None):
    c = default_config()
    c.model.family = "decoder"
    c.model.name = "checkpoint"
    c.data.batch_size = 8
    c.data.seq_len = 16
    c.total_steps = 1
    c.log_every = 1
    c.eval_every = 1000
    c.eval_steps = 1
    c.checkpoint.every = 1
    c.optimizer.learning_rate = 0.0
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    return c
"""


def test_train_continues_an_hf_qwen3_moe_as_it_is(tmp_path, capsys):
    """A config without ``upcycle`` and ``model.name=checkpoint`` keeps an MoE source's own
    experts and router (no fresh router, no copies): one step at learning rate 0 exports back
    to the same tensors, bit for bit."""
    torch.manual_seed(3)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
    )
    src = str(tmp_path / "qwen3_moe")
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(src)
    config = tmp_path / "continue.py"
    config.write_text(_CONTINUE)
    work = str(tmp_path / "run")
    train = ["train", "--config", str(config), f"--config.init_from={src}", "--workdir", work]
    assert main(train) == 0
    out = str(tmp_path / "back")
    export = ["export", "--src", f"{work}/checkpoints/1", "--dst", out, "--config", str(config)]
    assert main([*export, "--moe-layout", "per_expert"]) == 0
    before = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
    after = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert set(after) == set(before) and any(".experts.3." in k for k in after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


SHIPPED = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "qwen_moe_fine_grained.py")


@pytest.mark.parametrize(
    "family, arg, hf_class",
    [("qwen2", "", "Qwen2MoeForCausalLM"), ("qwen3", ":qwen3", "Qwen3MoeForCausalLM")],
)
def test_the_shipped_config_upcycles_verifies_and_exports(
    family, arg, hf_class, dense, work, ids, capsys
):
    """configs/qwen_moe_fine_grained.py as shipped (E24S2G8T6 gated for Qwen2, E24S0G8T8 for
    Qwen3; the architecture from the directory): upcycle -> verify -> export, and the HF MoE
    computes the dense model's logits. The default on a Qwen3 source exports nothing: no HF
    class holds shared experts with Qwen3's attention (one line, exit 2)."""
    model, src = dense[family]
    moe, out = str(work / f"shipped_{family}"), str(work / f"shipped_{family}_hf")
    config = SHIPPED + arg
    rc, text, err = _run(capsys, "upcycle", "--config", config, "--src", src, "--dst", moe)
    assert rc == 0, err
    rc, text, err = _run(capsys, "verify", "--config", config, "--dense", src, "--moe", moe)
    result = json.loads(text)
    assert rc == 0 and result["meant_to_preserve"] and result["ok"], (result, err)
    assert _run(capsys, "export", "--src", moe, "--dst", out)[0] == 0
    hf = _load(out)
    assert type(hf).__name__ == hf_class
    assert _max_abs(_hf_logits(hf, ids), _hf_logits(model, ids)) <= ATOL
    if family == "qwen3":
        wrong = str(work / "shipped_default_on_qwen3")
        assert _run(capsys, "upcycle", "--config", SHIPPED, "--src", src, "--dst", wrong)[0] == 0
        rc, _, err = _run(capsys, "export", "--src", wrong, "--dst", wrong + "_hf")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "shared experts" in err
        assert not os.path.exists(wrong + "_hf")
