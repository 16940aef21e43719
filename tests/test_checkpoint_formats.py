"""big_vision .npz and Orbax readers on files written by numpy / orbax directly."""

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
