"""``sparse-upcycle export --format hf`` of an upcycled Llama, checked against transformers.

A random tiny HF Llama (GQA) is saved with ``save_pretrained``, upcycled to an 8-expert top-2
MoE (``configs/llama_moe_8x_top2.py``: copy, ``topk_then_softmax``, dropless) and exported;
``transformers.MixtralForCausalLM`` must load the export and compute the dense Llama's function
(the experts are copies and the two top-K weights sum to one) and our JAX model's logits.
The independent reference is HF transformers' torch implementation on CPU.
"""

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from sparse_upcycle import models, surgeon
from sparse_upcycle.checkpoints.layout import config_from_dict
from sparse_upcycle.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "llama_moe_8x_top2.py")
VOCAB = 96
MATCH_DENSE = 1e-4  # |Δlogits| / max(1, max |dense logit|)
MATCH_OURS = 1e-5


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    """``sparse-upcycle ARGV`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _upcycle(capsys, src, dst, *overrides):
    rc, _, err = _run(
        capsys,
        "upcycle",
        "--config",
        CONFIG,
        "--src",
        src,
        "--dst",
        dst,
        "--config.model.overrides.dtype=float32",
        *overrides,
    )
    assert rc == 0, err
    return str(dst)


def _export(capsys, src, dst, *flags):
    rc, out, err = _run(capsys, "export", "--src", src, "--dst", dst, *flags)
    assert rc == 0, err
    assert out.startswith(f"wrote {dst}"), out
    return str(dst)


def _file_digests(path):
    """{relative path: sha256} of every file under ``path``."""
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _rel_err(got, want):
    assert np.shape(got) == np.shape(want), (np.shape(got), np.shape(want))
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()


def _our_logits(moe_dir, ids):
    """Logits of our JAX decoder built from the upcycled checkpoint at ``moe_dir``."""
    info, flat = surgeon.load_upcycled(moe_dir)
    cfg = config_from_dict("decoder", info["model"])
    model = models.build_model("decoder", cfg, flat)
    logits, _ = model(np.asarray(ids.numpy()), train=False)
    return np.asarray(logits, np.float32)


def _no_temporaries(parent):
    return [n for n in os.listdir(parent) if n.startswith(".export-")]


# --------------------------------------------------------------------------------------------
# Fixtures: one dense Llama, one upcycled checkpoint, one export per layout, built once.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export_hf")


@pytest.fixture(scope="module")
def dense(work):
    """(dense LlamaForCausalLM, its save_pretrained directory)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = work / "llama"
    model.save_pretrained(path)
    assert (path / "generation_config.json").is_file()
    return model, str(path)


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(np.random.default_rng(0).integers(3, VOCAB, (2, 12)))


@pytest.fixture(scope="module")
def moe(dense, work):
    """(upcycled directory, {file: sha256} before any export)."""
    src = str(work / "moe")
    rc = main(
        ["upcycle", "--config", CONFIG, "--src", dense[1], "--dst", src]
        + ["--config.model.overrides.dtype=float32"]
    )
    assert rc == 0
    info = json.load(open(os.path.join(src, "recipe.json")))
    assert info["recipe"]["method"] == "copy" and info["preserves_dense_function"]
    return src, _file_digests(src)


@pytest.fixture(scope="module")
def our_logits(moe, ids):
    return _our_logits(moe[0], ids)


@pytest.fixture(scope="module")
def fused(moe, work):
    dst = str(work / "out" / "fused")
    assert main(["export", "--src", moe[0], "--dst", dst]) == 0
    return dst


@pytest.fixture(scope="module")
def per_expert(moe, work):
    dst = str(work / "out" / "per_expert")
    flags = ["--moe-layout", "per_expert", "--max-shard-size", "20KB"]
    assert main(["export", "--src", moe[0], "--dst", dst, *flags]) == 0
    return dst


@pytest.fixture(scope="module")
def bf16(moe, work):
    dst = str(work / "out" / "bf16")
    assert main(["export", "--src", moe[0], "--dst", dst, "--dtype", "bfloat16"]) == 0
    return dst


# --------------------------------------------------------------------------------------------
# 1. End to end: Llama -> upcycle -> export -> MixtralForCausalLM.
# --------------------------------------------------------------------------------------------


def _check_mixtral_config(out):
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["intermediate_size"] == 48
    return config


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_mixtral_computes_the_dense_llama_and_our_moe(
    layout, request, dense, moe, ids, our_logits, work
):
    out = request.getfixturevalue(layout)
    config = _check_mixtral_config(out)
    assert config["dtype"] == "float32"
    # The source's generation config is carried over, byte for byte.
    with open(os.path.join(dense[1], "generation_config.json"), "rb") as f:
        want = f.read()
    with open(os.path.join(out, "generation_config.json"), "rb") as f:
        assert f.read() == want
    assert not _no_temporaries(work / "out")

    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    experts = mixtral.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 2 * 48, 32)
    assert tuple(experts.down_proj.shape) == (8, 32, 48)
    assert tuple(mixtral.model.layers[1].mlp.gate.weight.shape) == (8, 32)

    got = _hf_logits(mixtral, ids)
    want_dense = _hf_logits(dense[0], ids)
    assert got.shape == (2, 12, VOCAB)
    assert _rel_err(got, want_dense) < MATCH_DENSE
    assert _rel_err(got, our_logits) < MATCH_OURS


def test_per_expert_export_is_sharded_with_a_consistent_index(per_expert):
    index_path = os.path.join(per_expert, "model.safetensors.index.json")
    assert os.path.isfile(index_path)
    assert not os.path.exists(os.path.join(per_expert, "model.safetensors"))
    index = json.load(open(index_path))
    shards = sorted(n for n in os.listdir(per_expert) if n.endswith(".safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == shards
    seen, total = {}, 0
    for shard in shards:
        with safe_open(os.path.join(per_expert, shard), framework="np") as f:
            for name in f.keys():
                assert name not in seen, f"{name} in {seen.get(name)} and {shard}"
                seen[name] = shard
                total += f.get_tensor(name).nbytes
    assert seen == index["weight_map"]  # every tensor once, in the shard the index names
    assert index["metadata"]["total_size"] == total
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in seen
    assert "lm_head.weight" in seen
    assert not any(".mlp.experts." in name for name in seen)


def test_fused_export_is_one_file(fused):
    names = sorted(os.listdir(fused))
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(os.path.join(fused, "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.experts.gate_up_proj").shape == (8, 96, 32)
    assert not any("block_sparse_moe" in k for k in keys)


# --------------------------------------------------------------------------------------------
# 2. Generation.
# --------------------------------------------------------------------------------------------


def test_generate_matches_the_dense_llama(fused, dense, ids):
    mixtral = transformers.MixtralForCausalLM.from_pretrained(fused).eval()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        got = mixtral.generate(ids, pad_token_id=0, **kw)
        want = dense[0].generate(ids, pad_token_id=0, **kw)
    assert got.shape[1] > ids.shape[1]
    np.testing.assert_array_equal(got.numpy(), want.numpy())


# --------------------------------------------------------------------------------------------
# 3. Drop-Upcycling: not the dense function, but still ours.
# --------------------------------------------------------------------------------------------


def test_drop_upcycled_export_matches_our_model(dense, work, ids, capsys):
    src = _upcycle(
        capsys,
        dense[1],
        work / "moe_drop",
        "--config.upcycle.method=drop",
        "--config.upcycle.drop_ratio=0.5",
    )
    info = json.load(open(os.path.join(src, "recipe.json")))
    assert info["recipe"]["method"] == "drop" and not info["preserves_dense_function"]
    out = _export(capsys, src, work / "out_drop" / "hf")
    _check_mixtral_config(out)
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    got = _hf_logits(mixtral, ids)
    assert np.all(np.isfinite(got))
    assert _rel_err(got, _hf_logits(dense[0], ids)) > 1e-3  # part of each expert re-drawn
    assert _rel_err(got, _our_logits(src, ids)) < MATCH_OURS


def test_fine_grained_virtual_group_export_matches_our_model(dense, work, ids, capsys):
    """E4G2 (He et al. 2024) with top-2 renormalised routing in every layer: Mixtral holds it
    with intermediate_size = f/G, and computes what our model computes."""
    src = _upcycle(
        capsys,
        dense[1],
        work / "moe_vg",
        "--config.upcycle.method=virtual_group",
        "--config.upcycle.expansion=4",
        "--config.upcycle.granularity=2",
        "--config.upcycle.num_experts=8",
    )
    out = _export(capsys, src, work / "out_vg" / "hf")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["intermediate_size"] == 48 // 2 and config["num_local_experts"] == 8
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    got = _hf_logits(mixtral, ids)
    assert _rel_err(got, _our_logits(src, ids)) < MATCH_OURS
    assert _rel_err(got, _hf_logits(dense[0], ids)) > 1e-4  # scaled halves are not the dense MLP


# --------------------------------------------------------------------------------------------
# 4. Refusals: exit 2, one line naming the problem, nothing written.
# --------------------------------------------------------------------------------------------


def _assert_refused(capsys, parent, dst, phrase, *argv):
    rc, out, err = _run(capsys, "export", *argv)
    lines = err.strip().splitlines()
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("sparse-upcycle: error: "), err
    assert phrase in lines[0], lines[0]
    assert not os.path.exists(dst)
    assert not _no_temporaries(parent)
    return lines[0]


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["--config.model.moe.layers=every_other"], "every layer an MoE layer"),
        (
            [
                "--config.model.moe.ordering=softmax_then_topk",
                "--config.upcycle.ordering=softmax_then_topk",
            ],
            "without renormalize",
        ),
        (["--config.model.moe.eval_capacity_factor=1.0"], "so tokens can be dropped"),
    ],
    ids=["every_other", "softmax_then_topk", "eval_capacity"],
)
def test_refuses_moe_that_mixtral_computes_differently(
    overrides, phrase, request, dense, work, ids, capsys
):
    case = request.node.callspec.id
    src = _upcycle(capsys, dense[1], work / f"moe_{case}", *overrides)
    before = _file_digests(src)
    parent = work / f"out_{case}"
    parent.mkdir()
    dst = str(parent / "hf")
    line = _assert_refused(capsys, parent, dst, phrase, "--src", src, "--dst", dst)
    assert "Mixtral" in line
    if case == "eval_capacity":
        assert "--dropless" in line
    assert _file_digests(src) == before
    if case != "eval_capacity":
        return
    # --dropless accepts it; routing every token, the copies compute the dense function.
    _export(capsys, src, dst, "--dropless")
    config = _check_mixtral_config(dst)
    assert config["num_experts_per_tok"] == 2
    mixtral = transformers.MixtralForCausalLM.from_pretrained(dst).eval()
    assert _rel_err(_hf_logits(mixtral, ids), _hf_logits(dense[0], ids)) < MATCH_DENSE
    assert _file_digests(src) == before


def test_accepts_softmax_then_topk_with_renormalize(dense, work, ids, capsys):
    """softmax_then_topk with renormalize is Mixtral's own formulation: exported, and equal."""
    src = _upcycle(
        capsys,
        dense[1],
        work / "moe_renorm",
        "--config.model.moe.ordering=softmax_then_topk",
        "--config.upcycle.ordering=softmax_then_topk",
        "--config.model.moe.renormalize=True",
    )
    out = _export(capsys, src, work / "out_renorm" / "hf")
    _check_mixtral_config(out)
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    assert _rel_err(_hf_logits(mixtral, ids), _hf_logits(dense[0], ids)) < MATCH_DENSE


def test_refuses_bad_arguments(moe, fused, work, capsys):
    src = moe[0]
    parent = work / "out_bad"
    parent.mkdir()
    dst = str(parent / "hf")
    # --dst exists (here: a previous export) and no --overwrite: left as it was.
    before = _file_digests(fused)
    rc, _, err = _run(capsys, "export", "--src", src, "--dst", fused)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("sparse-upcycle: error: ") and "exists" in err and "--overwrite" in err
    assert _file_digests(fused) == before
    assert not _no_temporaries(work / "out")
    # An unparseable shard size.
    _assert_refused(
        capsys,
        parent,
        dst,
        "--max-shard-size",
        "--src",
        src,
        "--dst",
        dst,
        "--max-shard-size",
        "banana",
    )
    # A source that does not exist.
    missing = str(work / "no_such_moe")
    _assert_refused(
        capsys, parent, dst, "no such file or directory", "--src", missing, "--dst", dst
    )
    assert not os.path.exists(missing)
    assert os.listdir(parent) == []


def test_refuses_wrong_shapes_and_a_dst_that_holds_the_src(moe, dense, work, capsys):
    src = moe[0]
    parent = work / "out_bad2"
    parent.mkdir()
    dst = str(parent / "hf")
    # The tensors of one model under the config of another (tiny: d=32 but f=64, vocab 128).
    _assert_refused(
        capsys,
        parent,
        dst,
        "has shape",
        *("--src", os.path.join(src, "checkpoint"), "--src-format", "orbax", "--dst", dst),
        *("--config", CONFIG + ":tiny"),
    )
    # The full config takes its architecture from the HF checkpoint: it must be named.
    _assert_refused(
        capsys,
        parent,
        dst,
        "--hf-source",
        *("--src", os.path.join(src, "checkpoint"), "--src-format", "orbax", "--dst", dst),
        *("--config", CONFIG),
    )
    # --overwrite onto a directory that contains the source would delete the source.
    inner = parent / "inner"
    assert main(["export", "--src", src, "--dst", str(inner / "m"), "--format", "orbax"]) == 0
    capsys.readouterr()
    rc, _, err = _run(
        capsys, "export", "--src", str(inner / "m"), "--dst", str(inner), "--overwrite"
    )
    assert rc == 2 and "must not contain --src" in err
    assert (inner / "m" / "recipe.json").is_file()
    assert moe[1] == _file_digests(src)


def test_a_bare_checkpoint_exports_with_config_and_hf_source(moe, dense, fused, work, ids):
    """A checkpoint without recipe.json or hf_source/ (as a `train` step directory): the
    model comes from --config, config.json/tokenizer files from --hf-source."""
    out = str(work / "out_bare" / "hf")
    argv = ["export", "--src", os.path.join(moe[0], "checkpoint"), "--src-format", "orbax"]
    argv += ["--config", CONFIG, "--config.model.overrides.dtype=float32"]
    assert main(argv + ["--hf-source", dense[1], "--dst", out]) == 0
    with safe_open(os.path.join(out, "model.safetensors"), framework="np") as a:
        with safe_open(os.path.join(fused, "model.safetensors"), framework="np") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key))
    config = json.load(open(os.path.join(out, "config.json")))
    source = json.load(open(os.path.join(dense[1], "config.json")))
    assert config["model_type"] == "mixtral" and config["bos_token_id"] == source["bos_token_id"]
    # transformers 4.x reads the top-level key (MixtralConfig's own default would be 1e6)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert os.path.isfile(os.path.join(out, "generation_config.json"))


def test_a_train_step_of_the_upcycled_model_exports_with_the_hf_files(moe, dense, work, ids):
    """HF Llama -> upcycle -> train (the full config: architecture from the checkpoint) ->
    export of a step directory: train kept hf_source/ in its workdir, so neither the HF
    directory nor --hf-source is needed, and Mixtral computes what the trained model does."""
    workdir = work / "train"
    overrides = [
        "--config.model.overrides.dtype=float32",
        "--config.data.name=synthetic",
        "--config.data.batch_size=8",
        "--config.data.seq_len=16",
        "--config.total_steps=10",
        "--config.mesh.expert=1",
        "--config.mesh.model=1",
        "--config.optimizer.learning_rate=0.01",
        "--config.optimizer.warmup_steps=2",
        "--config.checkpoint.every=10",
        "--config.eval_every=10",
        "--config.eval_steps=1",
    ]
    argv = ["train", "--config", CONFIG, "--workdir", str(workdir)]
    assert main(argv + ["--config.init_from=" + moe[0], *overrides]) == 0
    assert (workdir / "hf_source" / "config.json").is_file()
    out = str(work / "out_train" / "hf")
    step = str(workdir / "checkpoints" / "10")
    assert main(["export", "--src", step, "--config", CONFIG, overrides[0], "--dst", out]) == 0
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint

    ckpt = OrbaxCheckpoint(step)
    info, _ = surgeon.load_upcycled(moe[0])
    cfg = config_from_dict("decoder", info["model"])
    flat = {k: ckpt.read(k) for k in ckpt.keys()}
    model = models.build_model("decoder", cfg, flat)
    ours = model(jnp.asarray(ids.numpy()), train=False)
    ours = np.asarray(ours[0] if isinstance(ours, tuple) else ours)
    mixtral = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    got = _hf_logits(mixtral, ids)
    assert _rel_err(got, ours) < MATCH_OURS
    assert _rel_err(got, _hf_logits(dense[0], ids)) > 1e-4  # it trained: not the dense model


def test_router_jitter_is_off_at_evaluation(moe, ids):
    """Jitter is a training-time perturbation: with train=False a key must change nothing."""
    info, flat = surgeon.load_upcycled(moe[0])
    cfg = config_from_dict("decoder", info["model"])
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, jitter_eps=0.5))
    model = models.build_model("decoder", cfg, flat)
    tokens = jnp.asarray(ids.numpy())
    plain = model(tokens, train=False)
    keyed = model(tokens, train=False, rng=jax.random.key(0))
    plain, keyed = (x[0] if isinstance(x, tuple) else x for x in (plain, keyed))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(keyed))


# --------------------------------------------------------------------------------------------
# 5. bfloat16.
# --------------------------------------------------------------------------------------------


def test_bfloat16_export(bf16, fused, dense, ids):
    config = _check_mixtral_config(bf16)
    assert config["dtype"] == "bfloat16"
    with safe_open(os.path.join(bf16, "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # The float32 export's tensors, rounded to bfloat16 (round to nearest even).
    with safe_open(os.path.join(fused, "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name).to(torch.bfloat16), value), name
    mixtral = transformers.MixtralForCausalLM.from_pretrained(bf16).eval()
    assert mixtral.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    got = _hf_logits(mixtral, ids)
    assert np.all(np.isfinite(got))
    # Rounded weights and bf16 activations: close to the dense model, not equal.
    assert _rel_err(got, _hf_logits(dense[0], ids)) < 1e-2


# --------------------------------------------------------------------------------------------
# 6. The source is only read.
# --------------------------------------------------------------------------------------------


def test_exports_leave_the_source_untouched(moe, fused, per_expert, bf16, work, capsys):
    src, before = moe
    # One more export, to the orbax layout, and an overwrite of an export.
    _export(capsys, src, work / "out" / "orbax", "--format", "orbax")
    _export(capsys, src, work / "out" / "fused2", "--overwrite")
    _export(capsys, src, work / "out" / "fused2", "--overwrite", "--moe-layout", "per_expert")
    assert os.path.isfile(work / "out" / "fused2" / "model.safetensors")
    assert not os.path.exists(work / "out" / "fused2" / "model.safetensors.index.json")
    assert _file_digests(src) == before
    assert before  # there were files to compare
    assert not _no_temporaries(work / "out")
