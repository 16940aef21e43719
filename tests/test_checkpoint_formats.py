"""big_vision .npz and Orbax readers on files written by numpy / orbax directly."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.npz import NpzCheckpoint
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint, is_orbax

PARAMS = {
    "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": np.arange(12.0).reshape(3, 4),
    "head/bias": np.arange(5, dtype=np.float32),
}


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_npz_reader(tmp_path, prefix):
    path = tmp_path / "vit.npz"
    np.savez(path, **{prefix + k: v for k, v in PARAMS.items()})
    ckpt = NpzCheckpoint(str(path))
    assert ckpt.keys() == sorted(PARAMS)
    for key, value in PARAMS.items():
        np.testing.assert_array_equal(ckpt.read(key), value)
        assert ckpt.shape(key) == value.shape


def test_npz_refuses_pickles_and_garbage(tmp_path):
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="cannot read"):
        NpzCheckpoint(str(pickled)).read("a")
    garbage = tmp_path / "bad.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        NpzCheckpoint(str(garbage))


@pytest.mark.parametrize("wrap", [True, False])
def test_orbax_reader(tmp_path, wrap):
    tree = {
        "Transformer": {
            "encoderblock_0": {
                "MlpBlock_0": {
                    "Dense_0": {
                        "kernel": PARAMS["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
                    }
                }
            }
        },
        "head": {"bias": PARAMS["head/bias"]},
    }
    state = {"params": tree, "step": np.asarray(7)} if wrap else tree
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "ckpt"), state)
    checkpointer.wait_until_finished()
    assert is_orbax(str(tmp_path / "ckpt"))
    ckpt = OrbaxCheckpoint(str(tmp_path / "ckpt"))
    assert ckpt.keys() == sorted(PARAMS)
    assert ckpt.step == (7 if wrap else None)
    for key, value in PARAMS.items():
        np.testing.assert_array_equal(ckpt.read(key), value)
    with pytest.raises(CheckpointError, match="not an Orbax"):
        OrbaxCheckpoint(str(tmp_path))


def test_streaming_writer_flushes_in_parts_and_reads_back(tmp_path):
    from sparse_upcycle.checkpoints.orbax import StreamingWriter

    rng = np.random.default_rng(0)
    params = {f"layers_{i}/mlp/wo/kernel": rng.normal(size=(8, 16)) for i in range(5)}
    writer = StreamingWriter(str(tmp_path / "ckpt"), flush_bytes=2000)  # ~2 tensors a save
    for key, value in params.items():
        writer.add(key, value)
        assert not (tmp_path / "ckpt").exists()  # nothing visible before close
    writer.close(step=42)
    ckpt = OrbaxCheckpoint(str(tmp_path / "ckpt"))
    assert ckpt.keys() == sorted(params) and ckpt.step == 42
    for key, value in params.items():
        np.testing.assert_array_equal(ckpt.read(key), value)


# --------------------------------------------------------------------------------------------
# The reader face, format detection, our layout's recipe.json, and TempOutput.
# --------------------------------------------------------------------------------------------


def test_readers_set_their_own_attributes(tmp_path):
    from sparse_upcycle.checkpoints.open import open_checkpoint
    from sparse_upcycle.checkpoints.reader import CheckpointReader
    from sparse_upcycle.models import vit

    path = tmp_path / "vit.npz"
    np.savez(path, **PARAMS)
    ckpt = open_checkpoint(str(path))
    assert isinstance(ckpt, CheckpointReader)
    assert (ckpt.path, ckpt.format, ckpt.step, ckpt.dense_step) == (str(path), "npz", None, None)
    assert not ckpt.is_upcycled and ckpt.info is None and ckpt.family is None
    assert ckpt.config is None and ckpt.model_config is None
    assert ckpt.optimizer_state_keys() == []
    with pytest.raises(CheckpointError, match="no optimizer state"):
        ckpt.read_optimizer_state("head/bias/v")
    # A format that does not describe its model takes the caller's config.
    cfg = vit.config("tiny")
    assert open_checkpoint(str(path), "npz", config=cfg).config is cfg

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "ckpt"), {"params": {"w": np.ones(3)}, "step": np.asarray(9)})
    checkpointer.wait_until_finished()
    ckpt = open_checkpoint(str(tmp_path / "ckpt"))
    assert (ckpt.format, ckpt.step, ckpt.dense_step, ckpt.is_upcycled) == ("orbax", 9, 9, False)
    assert ckpt.keys() == ["w"] and ckpt.optimizer_state_keys() == []


def test_detect_format_names_the_problem(tmp_path):
    from sparse_upcycle.checkpoints.open import FORMATS, detect_format, open_checkpoint

    assert FORMATS == ("auto", "t5x", "orbax", "npz", "hf")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        detect_format(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match=r"cannot tell .* \(t5x \| orbax \| npz \| hf\)"):
        detect_format(str(tmp_path))
    with pytest.raises(CheckpointError, match="unknown format 'zip'"):
        open_checkpoint(str(tmp_path), "zip")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "recipe.json").write_text("{}")
    assert detect_format(str(tmp_path / "ours")) == "orbax"  # our layout is Orbax underneath


UPCYCLE_KEYS = [
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


def test_recipe_json_one_writer_one_reader(tmp_path):
    import json

    from sparse_upcycle.checkpoints import layout
    from sparse_upcycle.models import vit

    src = tmp_path / "vit.npz"
    np.savez(src, **PARAMS)
    cfg = vit.config("tiny")
    common = dict(
        family="vit",
        model=cfg,
        source_path=str(src),
        source_format="npz",
        source_step=None,
        step=0,
    )
    (tmp_path / "up").mkdir()
    info = layout.write_recipe_json(
        str(tmp_path / "up"),
        recipe={"method": "copy"},
        recipe_name="copy",
        dense_model=cfg,
        optimizer_slots=0,
        preserves_dense_function=False,
        preservation=["why"],
        **common,
    )
    with open(tmp_path / "up" / "recipe.json", encoding="utf-8") as f:
        text = f.read()
    assert list(json.loads(text)) == UPCYCLE_KEYS  # upcycle's keys, in upcycle's order
    assert text == json.dumps(info, indent=2, default=str)
    assert layout.read_recipe_json(str(tmp_path / "up")) == json.loads(text)
    assert info["source"]["sha256"] == {"vit.npz": layout.checksums(str(src))["vit.npz"]}
    assert info["source"]["path"] == os.path.abspath(src)
    assert layout.config_from_dict("vit", info["model"]) == cfg

    (tmp_path / "ex").mkdir()  # export --format orbax: no dense model, no verdict
    info = layout.write_recipe_json(
        str(tmp_path / "ex"), recipe=None, recipe_name=None, optimizer_slots=0, **common
    )
    assert list(info) == [
        k
        for k in UPCYCLE_KEYS
        if k not in ("dense_model", "preserves_dense_function", "preservation")
    ]
    assert info["recipe"] is None and info["recipe_name"] is None

    with pytest.raises(CheckpointError, match="no recipe.json; not written by"):
        layout.read_recipe_json(str(tmp_path))
    (tmp_path / "ex" / "recipe.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"recipe.json: unreadable"):
        layout.read_recipe_json(str(tmp_path / "ex"))


def test_temp_output_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from sparse_upcycle.checkpoints.output import TempOutput

    src, dst = tmp_path / "src.npz", tmp_path / "out" / "dst"
    src.write_bytes(b"x")
    with TempOutput(str(src), str(dst), kind="upcycle", overwrite=False) as tmp:
        assert os.path.basename(tmp).startswith(f".upcycle-dst-{os.getpid()}-")
        assert not dst.exists()
        (tmp_path / "out" / os.path.basename(tmp) / "recipe.json").write_text("done")
    assert (dst / "recipe.json").read_text() == "done"
    assert os.listdir(tmp_path / "out") == ["dst"]

    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        TempOutput(str(src), str(dst), kind="upcycle", overwrite=False)
    with pytest.raises(RuntimeError, match="midway"):
        with TempOutput(str(src), str(dst), kind="export", overwrite=True) as tmp:
            (tmp_path / "out" / os.path.basename(tmp) / "g").write_text("half")
            raise RuntimeError("midway")
    assert os.listdir(tmp_path / "out") == ["dst"] and (dst / "recipe.json").read_text() == "done"
    with TempOutput(str(src), str(dst), kind="export", overwrite=True) as tmp:
        (tmp_path / "out" / os.path.basename(tmp) / "g").write_text("new")
    assert os.listdir(dst) == ["g"]  # replaced, not merged

    # --overwrite replaces an earlier output, never a directory of something else.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match=r"--dst .*theirs is not an earlier output"):
        TempOutput(str(src), str(theirs), kind="upcycle", overwrite=True)
    assert os.listdir(theirs) == ["notes.txt"]
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).write_text("{}")
    with TempOutput(str(src), str(hf), kind="export", overwrite=True) as tmp:
        pass
    assert os.listdir(hf) == []

    # --dst appearing while a run without --overwrite writes is not deleted.
    late = tmp_path / "out" / "late"
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        with TempOutput(str(src), str(late), kind="upcycle", overwrite=False):
            late.mkdir()
            (late / "theirs").write_text("keep")
    assert os.listdir(late) == ["theirs"] and sorted(os.listdir(tmp_path / "out")) == [
        "dst",
        "late",
    ]


def test_temp_output_path_checks_and_stale_partials(tmp_path):
    from sparse_upcycle.checkpoints.output import TempOutput

    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(CheckpointError, match="must not be --src or inside it"):
        TempOutput(str(src), str(src / "moe"), kind="upcycle", overwrite=True)
    with pytest.raises(CheckpointError, match="must not contain --src"):
        TempOutput(str(src), str(tmp_path), kind="upcycle", overwrite=True)
    # A temporary of a run whose process is gone is removed; a live one's and another kind's
    # are left alone.
    gone = subprocess_pid_that_exited()
    for name in (
        f".upcycle-moe-{gone}-abc",
        f".upcycle-moe-{os.getpid()}-live",
        f".export-moe-{gone}-x",
    ):
        (tmp_path / name).mkdir()
    with TempOutput(str(src), str(tmp_path / "moe"), kind="upcycle", overwrite=False):
        pass
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f".export-moe-{gone}-x", f".upcycle-moe-{os.getpid()}-live", "moe", "src"]
    )


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recipe_json_moe_layers_may_be_a_name_or_a_list():
    """``MoeConfig.layers`` is ``"every_other"`` (a name) or explicit blocks ([1, 3]); a
    recipe.json holding the list reads back as the tuple, and a value of neither kind is
    refused naming the field."""
    import json

    from sparse_upcycle.checkpoints import layout
    from sparse_upcycle.models import t5

    want = t5.config("tiny", encoder_moe={"num_experts": 4, "layers": (1,)})
    values = json.loads(json.dumps(layout.config_dict(want)))
    assert values["encoder_moe"]["layers"] == [1]
    assert layout.config_from_dict("t5", values) == want
    values["encoder_moe"]["layers"] = 3
    with pytest.raises(ValueError, match="model.encoder_moe.layers"):
        layout.config_from_dict("t5", values)


@pytest.mark.parametrize("reserve", [None, 64])  # 64 bytes: every header outgrows its room
def test_streamed_safetensors_shards_read_back(tmp_path, monkeypatch, reserve):
    """The streaming writer's shards are safetensors files that the library reads back bit for
    bit (names, dtypes incl. bfloat16, shapes incl. 0-d and empty), split at ``max_bytes``."""
    import json

    import ml_dtypes
    from safetensors import safe_open

    from sparse_upcycle.checkpoints import hf

    if reserve is not None:
        monkeypatch.setattr(hf, "HEADER_RESERVE", reserve)
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.normal(size=(64, 32)).astype(np.float32),
        "b.weight": rng.normal(size=(16,)).astype(ml_dtypes.bfloat16),
        "c.scalar": np.array(3, np.int64),
        "d.empty": np.zeros((0, 4), np.float16),
        "e.mask": rng.random((5, 3)) > 0.5,
        "f.weight": rng.normal(size=(40, 40)).astype(np.float32),
    }
    writer = hf.ShardedSafetensorsWriter(str(tmp_path), max_bytes=6000)  # a | b..e | f
    for name, value in tensors.items():
        writer.add(name, value)
    files = writer.close()
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]  # fmt: skip
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    seen = {}
    for file in files:
        with safe_open(str(tmp_path / file), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                seen[name] = f.get_tensor(name)
                assert index["weight_map"][name] == file
    assert sorted(seen) == sorted(tensors)
    for name, value in tensors.items():
        assert seen[name].dtype == value.dtype and seen[name].shape == value.shape
        assert seen[name].tobytes() == value.tobytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_chunked_tensors_stream_part_by_part_and_a_short_one_is_refused(tmp_path):
    """A ``Chunked`` tensor (an MoE layer's experts, one at a time; one array repeated for
    copies) reads back as the assembled array; parts that do not add up are an error."""
    import ml_dtypes
    from safetensors import safe_open

    from sparse_upcycle.checkpoints import hf
    from sparse_upcycle.checkpoints.chunked import Chunked

    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(1, 6, 4)).astype(np.float32) for _ in range(3)]
    repeated = rng.normal(size=(1, 2, 2)).astype(np.float32)
    writer = hf.ShardedSafetensorsWriter(str(tmp_path), max_bytes=1 << 20)
    writer.add("experts", Chunked((3, 6, 4), np.float32, lambda: iter(parts)))
    writer.add(
        "copies",
        Chunked((4, 2, 2), np.float32, lambda: iter([repeated] * 4)).astype(ml_dtypes.bfloat16),
    )
    writer.close()
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("experts"), np.concatenate(parts))
        copies = f.get_tensor("copies")
    assert copies.dtype == ml_dtypes.bfloat16 and copies.shape == (4, 2, 2)
    np.testing.assert_array_equal(copies, np.repeat(repeated, 4, 0).astype(ml_dtypes.bfloat16))
    short = hf.ShardedSafetensorsWriter(str(tmp_path / "short"), max_bytes=1 << 20)
    os.makedirs(tmp_path / "short")
    with pytest.raises(ValueError, match="its parts hold 96 bytes, not 288"):
        short.add("experts", Chunked((3, 6, 4), np.float32, lambda: iter(parts[:1])))
    short.abort()
