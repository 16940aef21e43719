"""Several dense sources in one recipe (``upcycle.sources``; Branch-Train-MiX, mergekit-moe).

Three random tiny HF Llamas of one architecture (and a fourth of another width) are the
sources. What each output tensor must be is computed here from the sources' own torch weights
(an expert: its source's MLP; a non-expert tensor: the base's, or the weighted mean), not
from our readers; and an MoE of identical sources, exported to Mixtral, must compute the dense
Llama in transformers.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from sparse_upcycle import surgeon
from sparse_upcycle.checkpoints.hf import HFCheckpoint
from sparse_upcycle.cli import main
from sparse_upcycle.upcycle import sources as multisource

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "llama_moe_8x_top2.py")
VOCAB = 64
LAYERS = 2


def _llama(seed, intermediate=48, rope_theta=10000.0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=rope_theta,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that averaging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("multisource")


@pytest.fixture(scope="module")
def llamas(work):
    """{name: (model, HF directory)}: a, b, c of one architecture; wide (f=64); theta (another
    RoPE base, same shapes); a_copy (a's files in another directory); c_npz (c's tensors in a
    big_vision-style .npz, for mixed formats)."""
    out = {}
    for name, seed, kw in (
        ("a", 0, {}),
        ("b", 1, {}),
        ("c", 2, {}),
        ("wide", 3, {"intermediate": 64}),
        ("theta", 4, {"rope_theta": 500000.0}),
    ):
        model = _llama(seed, **kw)
        path = str(work / name)
        model.save_pretrained(path)
        out[name] = (model, path)
    shutil.copytree(out["a"][1], str(work / "a_copy"))
    out["a_copy"] = (out["a"][0], str(work / "a_copy"))
    hf = HFCheckpoint(out["c"][1])
    npz = str(work / "c.npz")
    np.savez(npz, **{k: hf.read(k) for k in hf.keys()})
    out["c_npz"] = (out["c"][0], npz)
    return out


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _upcycle(capsys, dst, paths, *overrides, src=None):
    argv = ["upcycle", "--config", CONFIG, "--dst", dst]
    argv += ["--config.model.overrides.dtype=float32", "--config.model.moe.capacity_factor=None"]
    if src:
        argv += ["--src", src]
    if paths is not None:
        argv.append(f"--config.upcycle.sources={json.dumps([str(p) for p in paths])}")
    return _run(capsys, *argv, *overrides)


def _w(model, name):
    """A torch parameter as the [in, out] kernel our layout stores (numpy float64)."""
    return model.state_dict()[name].double().numpy()


# --------------------------------------------------------------------------------------------
# Each expert is its source's MLP; each other tensor the base's or the weighted mean.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed(llamas, work):
    """Experts from a, b, c (c read from an .npz) in the order [0, 1, 2, 1], base b,
    attention and norms averaged with weights 1:2:1, embeddings from the base."""
    dst = str(work / "mixed")
    paths = [llamas["a"][1], llamas["b"][1], llamas["c_npz"][1]]
    assert main(["upcycle", "--config", CONFIG, "--dst", dst, *_mixed_recipe(paths)]) == 0
    return dst, paths


def _mixed_recipe(paths):
    return [
        "--config.model.overrides.dtype=float32",
        "--config.model.moe.capacity_factor=None",
        f"--config.upcycle.sources={json.dumps(paths)}",
        "--config.upcycle.expert_sources=[0, 1, 2, 1]",
        "--config.upcycle.num_experts=4",
        "--config.upcycle.base_source=1",
        "--config.upcycle.non_expert=attention=average,norm=average",
        "--config.upcycle.source_weights=[1.0, 2.0, 1.0]",
    ]


def test_each_expert_is_its_sources_mlp_and_the_rest_as_chosen(mixed, llamas):
    dst, paths = mixed
    info, flat = surgeon.load_upcycled(dst)
    models = [llamas[n][0] for n in ("a", "b", "c")]
    weights = np.array([1.0, 2.0, 1.0]) / 4.0
    for layer in range(LAYERS):
        hf = f"model.layers.{layer}"
        ours = f"layers_{layer}"
        for e, s in enumerate([0, 1, 2, 1]):
            for name, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                got = flat[f"{ours}/mlp/expert/{name}/kernel"][e]
                want = _w(models[s], f"{hf}.mlp.{theirs}.weight").T
                np.testing.assert_array_equal(got, want.astype(np.float32))
        for name, theirs in (("query", "q_proj"), ("out", "o_proj")):
            got = flat[f"{ours}/attention/{name}/kernel"]
            want = sum(
                w * _w(m, f"{hf}.self_attn.{theirs}.weight").T
                for w, m in zip(weights, models, strict=True)
            )
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        got = flat[f"{ours}/pre_mlp_norm/scale"]
        want = sum(
            w * _w(m, f"{hf}.post_attention_layernorm.weight")
            for w, m in zip(weights, models, strict=True)
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # embeddings and the output projection: the base's (b), exactly
    np.testing.assert_array_equal(
        flat["token_embedder/embedding"],
        _w(models[1], "model.embed_tokens.weight").astype(np.float32),
    )
    np.testing.assert_array_equal(
        flat["logits_dense/kernel"], _w(models[1], "lm_head.weight").T.astype(np.float32)
    )
    # every source recorded with its checksums; the run is not meant to keep a dense function
    assert [s["path"] for s in info["sources"]] == [os.path.abspath(p) for p in paths]
    assert [s["format"] for s in info["sources"]] == ["hf", "hf", "npz"]
    for s in info["sources"]:
        assert s["sha256"] and all(len(v) == 64 for v in s["sha256"].values() if "link" not in v)
    assert info["source"]["path"] == os.path.abspath(paths[1])
    assert info["preserves_dense_function"] is False
    assert "3 different dense sources" in info["preservation"][0]
    assert info["recipe"]["expert_sources"] == [0, 1, 2, 1]


def test_every_source_tensor_is_read_once(llamas, work, monkeypatch, capsys):
    """Streaming: each tensor of each source is read at most once (a layer's MLP of every
    source, then let go), whatever the mode."""
    reads = {}
    original = HFCheckpoint.read

    def counting(self, key):
        reads[self.path, key] = reads.get((self.path, key), 0) + 1
        return original(self, key)

    monkeypatch.setattr(HFCheckpoint, "read", counting)
    paths = [llamas["a"][1], llamas["b"][1]]
    rc, _, err = _upcycle(
        capsys,
        str(work / "counted"),
        paths,
        "--config.upcycle.num_experts=4",
        "--config.upcycle.experts_per_source=2",
        "--config.upcycle.non_expert=average",
    )
    assert rc == 0, err
    assert reads and max(reads.values()) == 1
    assert {p for p, _ in reads} == set(paths)


# --------------------------------------------------------------------------------------------
# Identical sources: the Mixtral export computes the dense Llama.
# --------------------------------------------------------------------------------------------


def test_identical_sources_export_to_a_mixtral_that_computes_the_dense_llama(llamas, work, capsys):
    moe, out = str(work / "same"), str(work / "same_hf")
    rc, printed, err = _upcycle(
        capsys,
        moe,
        [llamas["a"][1], llamas["a_copy"][1]],
        "--config.upcycle.num_experts=8",
        "--config.upcycle.experts_per_source=4",
        "--config.upcycle.non_expert=average",
    )
    assert rc == 0, err
    assert "meant to preserve the dense function: True" in printed  # one function, two copies
    assert _run(capsys, "export", "--src", moe, "--dst", out)[0] == 0
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, VOCAB, (2, 10)))
    with torch.no_grad():
        want = llamas["a"][0](input_ids=ids).logits.double().numpy()
        got = mixtral(input_ids=ids).logits.double().numpy()
    assert np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))) <= 1e-4


# --------------------------------------------------------------------------------------------
# One pass, HF to HF: upcycle --output-format hf writes what upcycle + export write.
# --------------------------------------------------------------------------------------------


def _safetensors(directory):
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_one_pass_hf_output_equals_upcycle_then_export(mixed, work, capsys, layout):
    """The mixed recipe (three sources, one an .npz, base b, averaged attention and norms,
    random routers) in one pass: the same tensors, bit for bit, and the same config.json as
    the two-step path, in shards of the size asked for; the recipe and every source's
    checksums beside them."""
    moe, paths = mixed
    two_step = str(work / f"mixed_hf_{layout}")
    export = ["export", "--src", moe, "--dst", two_step, "--moe-layout", layout]
    assert _run(capsys, *export, "--dtype", "bfloat16", "--max-shard-size", "20KB")[0] == 0
    one_pass = str(work / f"mixed_one_pass_{layout}")
    rc, printed, err = _run(
        capsys,
        "upcycle",
        "--config",
        CONFIG,
        "--dst",
        one_pass,
        "--output-format",
        "hf",
        "--dtype",
        "bfloat16",
        "--moe-layout",
        layout,
        "--max-shard-size",
        "20KB",
        *_mixed_recipe(paths),
    )
    assert rc == 0, err
    assert "MixtralForCausalLM (bfloat16" in printed, printed
    want, got = _safetensors(two_step), _safetensors(one_pass)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == value.tobytes(), name
    for name in ("config.json", "model.safetensors.index.json"):
        with open(os.path.join(two_step, name)) as a, open(os.path.join(one_pass, name)) as b:
            assert json.load(a) == json.load(b), name
    shards = [n for n in os.listdir(one_pass) if n.endswith(".safetensors")]
    assert len(shards) > 1
    with open(os.path.join(one_pass, surgeon.HF_RECIPE_FILE)) as f:
        recipe = json.load(f)
    assert [s["path"] for s in recipe["sources"]] == [os.path.abspath(p) for p in paths]
    assert all(s["sha256"] for s in recipe["sources"])
    assert recipe["source"]["sha256"] == recipe["sources"][1]["sha256"]  # the base, hashed once


def test_one_pass_identical_sources_compute_the_dense_llama(llamas, work, capsys):
    out = str(work / "same_one_pass")
    rc, _, err = _upcycle(
        capsys,
        out,
        [llamas["a"][1], llamas["a_copy"][1]],
        "--output-format",
        "hf",
        "--config.upcycle.num_experts=8",
        "--config.upcycle.experts_per_source=4",
    )
    assert rc == 0, err
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, VOCAB, (2, 10)))
    with torch.no_grad():
        want = llamas["a"][0](input_ids=ids).logits.double().numpy()
        got = mixtral(input_ids=ids).logits.double().numpy()
    assert np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))) <= 1e-4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "bfloat16"], "--dtype goes with --output-format hf"),
        (["--max-shard-size", "1MB"], "--max-shard-size goes with --output-format hf"),
        (
            ["--output-format", "hf", "--config.upcycle.optimizer=tile"],
            "holds no optimizer state",
        ),
        (["--output-format", "hf", "--max-shard-size", "lots"], "lots"),
    ],
)
def test_one_pass_refusals_are_one_line(llamas, work, capsys, extra, message):
    dst = str(work / "refused_one_pass")
    rc, _, err = _upcycle(capsys, dst, None, *extra, src=llamas["a"][1])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not os.path.exists(dst)


# --------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written, nothing read.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other, overrides, message",
    [
        ("wide", (), "has shape"),
        ("theta", (), "rope_theta"),
        ("b", ("--config.upcycle.num_experts=3",), "set upcycle.num_experts=2"),
        (
            "b",
            ("--config.upcycle.num_experts=2", "--config.upcycle.expert_sources=[0, 2]"),
            "expert_sources[1] must be a source index in 0..1",
        ),
        (
            "b",
            ("--config.upcycle.num_experts=2", "--config.upcycle.method=virtual_group"),
            "method must be one of ('copy', 'drop')",
        ),
        (
            "b",
            ("--config.upcycle.num_experts=2", "--config.upcycle.non_expert=attn=average"),
            "'attn=average' is not GROUP=MODE",
        ),
        (
            "b",
            ("--config.upcycle.num_experts=2", "--config.upcycle.source_weights=[1.0]"),
            "1 weights for 2 sources",
        ),
        (
            "b",
            ("--config.upcycle.num_experts=2", "--config.upcycle.base_source=2"),
            "base_source must be in 0..1",
        ),
    ],
)
def test_bad_sources_are_one_line_and_nothing_is_read(
    llamas, work, capsys, monkeypatch, other, overrides, message
):
    def refuse(self, key):
        raise AssertionError(f"read {key} before the sources were checked")

    monkeypatch.setattr(HFCheckpoint, "read", refuse)
    dst = work / f"bad_{other}_{len(overrides)}"
    n = overrides[0] if overrides else "--config.upcycle.num_experts=2"
    rc, _, err = _upcycle(capsys, str(dst), [llamas["a"][1], llamas[other][1]], n, *overrides)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not dst.exists()


def test_src_and_sources_together_are_refused(llamas, work, capsys):
    dst = work / "both"
    rc, _, err = _upcycle(
        capsys, str(dst), [llamas["a"][1]], "--config.upcycle.num_experts=1", src=llamas["b"][1]
    )
    assert rc == 2 and "--src and upcycle.sources both name" in err
    rc, _, err = _upcycle(capsys, str(dst), None)
    assert rc == 2 and "no dense source" in err
    assert not dst.exists()


def test_multi_source_fields_need_sources(llamas, work, capsys):
    rc, _, err = _upcycle(
        capsys, str(work / "x"), None, "--config.upcycle.base_source=1", src=llamas["a"][1]
    )
    assert rc == 2 and "upcycle.base_source needs upcycle.sources" in err


# --------------------------------------------------------------------------------------------
# Units: parameter groups and the non_expert spec.
# --------------------------------------------------------------------------------------------


def test_parameter_groups_and_modes():
    group = multisource.parameter_group
    assert group("token_embedder/embedding") == "embedding"
    assert group("decoder/logits_dense/kernel") == "embedding"
    assert group("layers_0/attention/query/kernel") == "attention"
    assert group("encoder/relpos_bias/rel_embedding") == "attention"
    assert group("layers_0/attention/query_norm/scale") == "norm"
    assert group("Transformer/encoderblock_0/LayerNorm_0/scale") == "norm"
    assert group("layers_1/mlp/wi_0/kernel") == "mlp"
    assert group("Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias") == "mlp"
    assert (
        group("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/bias") == "attention"
    )
    assert multisource.parse_non_expert("average") == dict.fromkeys(multisource.GROUPS, "average")
    spec = multisource.parse_non_expert("mlp=average, norm=average")
    assert spec == {
        "embedding": "base",
        "attention": "base",
        "norm": "average",
        "mlp": "average",
        "other": "base",
    }


# --------------------------------------------------------------------------------------------
# Online: `train` with upcycle.sources builds, in memory, what `upcycle` writes.
# --------------------------------------------------------------------------------------------


def _online_params(paths, init_from, *extra):
    from sparse_upcycle import sharding
    from sparse_upcycle.checkpoints.tree import flatten
    from sparse_upcycle.config import load_config
    from sparse_upcycle.init_from import initial_params, open_init_source
    from sparse_upcycle.training import build_training

    mesh = ["--config.mesh.expert=1", "--config.mesh.model=1", "--config.model.remat=none"]
    config = load_config(
        CONFIG, [*_mixed_recipe(paths), f"--config.init_from={init_from}", *mesh, *extra]
    )
    source = open_init_source(config)
    t = build_training(config, source, sharding.mesh_from_config(config.mesh))
    params, _ = initial_params(config, t.spec, source, t.abstract_params, t.param_sh)
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def test_online_upcycling_of_several_sources_equals_the_upcycle_output(mixed):
    dst, paths = mixed
    _, written = surgeon.load_upcycled(dst)
    online = _online_params(paths, paths[1])
    assert set(online) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(online[key], value, err_msg=key)


def test_online_sources_refusals_are_one_line(mixed, work):
    from sparse_upcycle.checkpoints.errors import CheckpointError
    from sparse_upcycle.config import ConfigError

    dst, paths = mixed
    with pytest.raises(
        ConfigError, match=r"init_from must be the base source upcycle\.sources\[1\]"
    ):
        _online_params(paths, paths[0])
    with pytest.raises(ConfigError, match="prompted routers are built by `sparse-upcycle upcycle`"):
        _online_params(
            paths,
            paths[1],
            "--config.upcycle.router_init=cheap_embed",
            '--config.upcycle.positive_prompts=[["a"], ["b"], ["c"], ["d"]]',
        )
    with pytest.raises(CheckpointError, match="is an upcycle output"):
        _online_params([dst, paths[1], paths[2]], paths[1])
