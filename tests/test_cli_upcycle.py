"""``sparse-upcycle upcycle | verify | inspect`` end to end on small checkpoints in each format."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints.layout import config_from_dict
from sparse_upcycle.checkpoints.open import open_checkpoint
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.checkpoints.t5x import write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.models import t5, vit

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "upcycle_tiny.py")


def _params(model):
    return flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _save_tiny_llama(path, seed=0):
    """A random tiny HF Llama with GQA, saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _upcycle_and_verify(family, src, tmp_path, capsys, *extra):
    dst = str(tmp_path / f"{family}-moe")
    before = _digest(src)
    assert (
        cli.main(["upcycle", "--config", f"{CONFIG}:{family}", "--src", src, "--dst", dst, *extra])
        == 0
    )
    assert _digest(src) == before  # the source is never modified
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["source"]["sha256"] and info["package_version"]
    capsys.readouterr()
    assert (
        cli.main(["verify", "--config", f"{CONFIG}:{family}", "--dense", src, "--moe", dst, *extra])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["meant_to_preserve"] and result["ok"]
    assert result["max_abs_delta"] < 1e-4
    return dst


def test_vit_from_big_vision_npz(tmp_path, capsys):
    src = str(tmp_path / "vit.npz")
    np.savez(src, **_params(vit.ViT(vit.config("tiny", head_zeroinit=False), rngs=nnx.Rngs(0))))
    dst = _upcycle_and_verify("vit", src, tmp_path, capsys)
    assert cli.main(["inspect", dst]) == 0
    report = capsys.readouterr().out
    assert "format:  orbax (sparse_upcycle upcycle output)" in report
    assert "Transformer/encoderblock_1/MlpBlock_0/expert/Dense_0/kernel" in report
    assert "active per token" in report and "expert_choice" in report
    # A tampered expert must make verify fail (exit 1): verify can fail.
    from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint, write_orbax

    ckpt = OrbaxCheckpoint(os.path.join(dst, "checkpoint"))
    flat = {k: ckpt.read(k) for k in ckpt.keys()}
    key = "Transformer/encoderblock_1/MlpBlock_0/expert/Dense_1/kernel"
    # Random, not constant: a constant shift of every output feature vanishes in LayerNorm.
    flat[key][1] += np.random.default_rng(0).normal(0, 0.5, flat[key][1].shape)
    import shutil

    shutil.rmtree(os.path.join(dst, "checkpoint"))
    write_orbax(os.path.join(dst, "checkpoint"), flat)
    assert cli.main(["verify", "--config", f"{CONFIG}:vit", "--dense", src, "--moe", dst]) == 1


def test_t5_from_t5x(tmp_path, capsys):
    src = str(tmp_path / "checkpoint_100")
    write_t5x(src, _params(t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))), step=100)
    dst = _upcycle_and_verify("t5", src, tmp_path, capsys)
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["source"]["format"] == "t5x" and info["source"]["step"] == 100
    assert list(info) == [
        "package_version",
        "recipe",
        "recipe_name",
        "family",
        "model",
        "dense_model",
        "source",
        "step",
        "optimizer_slots",
        "preserves_dense_function",
        "preservation",
    ]
    # Both checkpoints open behind the one reader face, with what they know set by themselves.
    dense = open_checkpoint(src)
    assert (dense.format, dense.step, dense.dense_step, dense.is_upcycled) == (
        "t5x",
        100,
        100,
        False,
    )
    assert dense.info is None and dense.config is None and dense.family is None
    ours = open_checkpoint(dst)
    assert (ours.format, ours.is_upcycled, ours.family, ours.path) == ("upcycled", True, "t5", dst)
    assert ours.info == info and (ours.step, ours.dense_step) == (info["step"], 100)
    assert ours.model_config == config_from_dict("t5", info["model"])
    assert ours.config == config_from_dict("t5", info["dense_model"])  # the dense architecture
    assert (
        ours.config.encoder_moe.num_experts == 0
        and ours.config.emb_dim == t5.config("tiny").emb_dim
    )
    assert ours.model_config.encoder_moe.num_experts == info["recipe"]["num_experts"]
    assert ours.keys() == OrbaxCheckpoint(os.path.join(dst, "checkpoint")).keys()
    assert ours.optimizer_state_keys() == []
    # An upcycle output is not a dense checkpoint to upcycle or verify against.
    for argv in (
        ["upcycle", "--src", dst, "--dst", str(tmp_path / "again")],
        ["verify", "--dense", dst, "--moe", dst],
    ):
        code = cli.main([argv[0], "--config", f"{CONFIG}:t5", *argv[1:]])
        err = capsys.readouterr().err
        assert code == 2 and "not a dense checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "again")


def test_llama_from_hf_safetensors(tmp_path, capsys):
    _save_tiny_llama(tmp_path / "llama", seed=0)
    _upcycle_and_verify(
        "decoder", str(tmp_path / "llama"), tmp_path, capsys, "--config.model.name=checkpoint"
    )


def test_virtual_group_exact_preserves_llama(tmp_path, capsys):
    """E2G2T2 with exact scaling and topk_then_softmax: each picked group of G experts sums to
    the dense MLP times its weight, for any router scores (He et al. 2024)."""
    _save_tiny_llama(tmp_path / "llama", seed=1)
    vg = [
        "--config.model.name=checkpoint",
        "--config.upcycle.method=virtual_group",
        "--config.upcycle.expansion=2",
        "--config.upcycle.granularity=2",
        "--config.upcycle.k=2",
        "--config.upcycle.scaling=exact",
        "--config.upcycle.ordering=topk_then_softmax",
        "--config.upcycle.router_init_std=1.0",
        "--config.model.moe.ordering=topk_then_softmax",
    ]
    dst = _upcycle_and_verify("decoder", str(tmp_path / "llama"), tmp_path, capsys, *vg)
    info = json.load(open(os.path.join(dst, "recipe.json")))
    assert info["recipe_name"] == "E2G2T2" and info["preserves_dense_function"]
    mismatch = [*vg, "--config.model.moe.k=4"]
    code = cli.main(
        [
            "upcycle",
            "--config",
            f"{CONFIG}:decoder",
            "--src",
            str(tmp_path / "llama"),
            "--dst",
            str(tmp_path / "x"),
            *mismatch,
        ]
    )
    assert code == 2 and "virtual_group scaling assumes" in capsys.readouterr().err


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    src = str(tmp_path / "vit.npz")
    np.savez(src, **_params(vit.ViT(vit.config("tiny", mlp_dim=48), rngs=nnx.Rngs(0))))
    dst = str(tmp_path / "out")
    cases = [
        (["--src", str(tmp_path / "missing.npz")], "no such"),
        (["--src", src], "model config expects"),  # mlp_dim 48 vs the config's tiny
        (["--src", src, "--config.upcycle.method=magic"], "method must be one of"),
        (["--src", src, "--config.upcycle.nope=1"], "unknown field config.upcycle.nope"),
        (["--src", src, "--config.model.moe.capacity_factor=-1.0"], "capacity_factor > 0"),
    ]
    for args, message in cases:
        code = cli.main(["upcycle", "--config", f"{CONFIG}:vit", "--dst", dst, *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(dst)
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".upcycle-")]
    os.makedirs(dst)
    assert cli.main(["upcycle", "--config", f"{CONFIG}:vit", "--src", src, "--dst", dst]) == 2
    assert "--overwrite" in capsys.readouterr().err
    t5x_dir = tmp_path / "checkpoint_1"
    write_t5x(str(t5x_dir), {"a/kernel": np.ones((2, 2), np.float32)})
    inside = str(t5x_dir / "moe")
    assert (
        cli.main(["upcycle", "--config", f"{CONFIG}:t5", "--src", str(t5x_dir), "--dst", inside])
        == 2
    )
    assert "inside it" in capsys.readouterr().err and not os.path.exists(inside)


def test_entry_point_reports_errors_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "inspect", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("sparse-upcycle: error:") and "Traceback" not in out.stderr


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04broken"])
def test_corrupt_npz_exits_2(tmp_path, capsys, garbage):
    src = tmp_path / "bad.npz"
    src.write_bytes(garbage)
    code = cli.main(
        ["upcycle", "--config", f"{CONFIG}:vit", "--src", str(src), "--dst", str(tmp_path / "out")]
    )
    assert code == 2 and "not a readable .npz" in capsys.readouterr().err


def test_corrupt_zarr_chunk_and_safetensors_exit_2(tmp_path, capsys):
    src = tmp_path / "checkpoint_1"
    write_t5x(str(src), _params(t5.T5(t5.config("tiny"), rngs=nnx.Rngs(0))))
    chunk_dir = src / "target.token_embedder.embedding"
    chunk = next(p for p in chunk_dir.iterdir() if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated gzip chunk
    code = cli.main(
        ["upcycle", "--config", f"{CONFIG}:t5", "--src", str(src), "--dst", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "token_embedder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    _save_tiny_llama(tmp_path / "llama", seed=0)
    st = tmp_path / "llama" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    capsys.readouterr()  # drop transformers' own progress output
    code = cli.main(
        [
            "upcycle",
            "--config",
            f"{CONFIG}:decoder",
            "--config.model.name=checkpoint",
            "--src",
            str(tmp_path / "llama"),
            "--dst",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "safetensors" in err and len(err.strip().splitlines()) == 1


def test_write_error_midway_leaves_nothing(tmp_path, capsys, monkeypatch):
    from sparse_upcycle.checkpoints import orbax as orbax_io

    src = str(tmp_path / "vit.npz")
    np.savez(src, **_params(vit.ViT(vit.config("tiny"), rngs=nnx.Rngs(0))))

    def full_disk(self, step=None):
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "partial"), "wb") as f:
            f.write(b"x" * 100)
        raise OSError(28, "No space left on device", self.path)

    monkeypatch.setattr(orbax_io.StreamingWriter, "close", full_disk)
    code = cli.main(
        ["upcycle", "--config", f"{CONFIG}:vit", "--src", src, "--dst", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["vit.npz"]  # no output, no temporary left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config.upcycle.num_experts=0"], "must all be >= 1"),
        (["--config.upcycle.method=drop", "--config.upcycle.drop_ratio=1.5"], "in [0, 1]"),
        (["--config.model.moe.router=top_k", "--config.model.moe.k=8"], "k <= num_experts"),
        (["--config.model.moe.layers=[7]"], "indices must be in [0, 2)"),
        (
            [
                "--config.upcycle.method=virtual_group",
                "--config.upcycle.granularity=3",
                "--config.upcycle.k=2",
            ],
            "K % G == 0",
        ),
        (
            [
                "--config.upcycle.method=virtual_group",
                "--config.upcycle.granularity=2",
                "--config.upcycle.k=2",
                "--config.upcycle.expansion=1",
                "--config.model.moe.router=top_k",
                "--config.model.moe.k=2",
            ],
            "bias-free",
        ),
    ],
)
def test_impossible_hyperparameters_exit_2(tmp_path, capsys, args, message):
    src = str(tmp_path / "vit.npz")
    np.savez(src, **_params(vit.ViT(vit.config("tiny"), rngs=nnx.Rngs(0))))
    code = cli.main(
        [
            "upcycle",
            "--config",
            f"{CONFIG}:vit",
            "--src",
            src,
            "--dst",
            str(tmp_path / "out"),
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["vit.npz"]
