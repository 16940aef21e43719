"""T5X legacy checkpoint reader, on step directories laid out here the way t5x writes them
(flax msgpack state with tensorstore zarr specs whose kvstore paths are relative)."""

import os

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.t5x import T5XCheckpoint, write_t5x


def _zarr(step_dir, name, arr):
    """Write one array as T5X does and return the spec it stores in the msgpack."""
    dtype = "bfloat16" if arr.dtype == ml_dtypes.bfloat16 else arr.dtype.str
    meta = {
        "shape": list(arr.shape),
        "chunks": [max(1, arr.shape[0] // 2), *arr.shape[1:]],
        "dtype": dtype,
        "compressor": {"id": "gzip", "level": 1},
    }
    absolute = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(step_dir, name)},
        "metadata": meta,
    }
    ts.open(absolute, create=True).result().write(arr).result()
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": name}, "metadata": meta}


@pytest.fixture
def t5x_dir(tmp_path):
    rng = np.random.default_rng(0)
    step_dir = str(tmp_path / "checkpoint_1000")
    os.makedirs(step_dir)
    wi = rng.normal(size=(16, 32)).astype(ml_dtypes.bfloat16)
    emb = rng.normal(size=(20, 16)).astype(np.float32)
    scale = rng.normal(size=(16,)).astype(np.float32)
    v_row = rng.normal(size=(16,)).astype(np.float32)
    state = {
        "optimizer": {
            "target": {
                "encoder": {
                    "layers_0": {
                        "mlp": {
                            "wi_0": {
                                "kernel": _zarr(
                                    step_dir, "target.encoder.layers_0.mlp.wi_0.kernel", wi
                                )
                            }
                        }
                    },
                    "encoder_norm": {"scale": scale},
                },  # small: inline ndarray ext type
                "token_embedder": {
                    "embedding": _zarr(step_dir, "target.token_embedder.embedding", emb)
                },
            },
            "state": {
                "step": np.asarray(1000, np.int32),
                "param_states": {"encoder": {"encoder_norm": {"scale": {"v_row": v_row}}}},
            },
        }
    }
    with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    return (
        step_dir,
        {
            "encoder/layers_0/mlp/wi_0/kernel": wi,
            "token_embedder/embedding": emb,
            "encoder/encoder_norm/scale": scale,
        },
        v_row,
    )


@pytest.mark.parametrize("as_file", [False, True])
def test_reads_params_lazily_with_bfloat16(t5x_dir, as_file):
    step_dir, expected, v_row = t5x_dir
    ckpt = T5XCheckpoint(os.path.join(step_dir, "checkpoint") if as_file else step_dir)
    assert ckpt.keys() == sorted(expected)
    assert ckpt.step == 1000
    for key, arr in expected.items():
        assert ckpt.shape(key) == arr.shape and ckpt.dtype(key) == arr.dtype
        got = ckpt.read(key)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    assert ckpt.optimizer_state_keys() == ["encoder/encoder_norm/scale/v_row"]
    np.testing.assert_array_equal(
        ckpt.read_optimizer_state("encoder/encoder_norm/scale/v_row"), v_row
    )


def test_bad_inputs_raise_checkpoint_error(t5x_dir, tmp_path):
    step_dir, _, _ = t5x_dir
    with pytest.raises(CheckpointError, match="not a T5X checkpoint"):
        T5XCheckpoint(str(tmp_path / "nowhere"))
    corrupt = tmp_path / "checkpoint_2"
    corrupt.mkdir()
    (corrupt / "checkpoint").write_bytes(b"\x93not msgpack at all")
    with pytest.raises(CheckpointError, match="cannot parse"):
        T5XCheckpoint(str(corrupt))
    ckpt = T5XCheckpoint(step_dir)
    os.rename(
        os.path.join(step_dir, "target.token_embedder.embedding"), os.path.join(step_dir, "moved")
    )
    with pytest.raises(CheckpointError, match="token_embedder"):
        ckpt.read("token_embedder/embedding")
    with pytest.raises(CheckpointError, match="no tensor"):
        ckpt.read("decoder/nothing")


def test_write_then_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    params = {
        "a/b/kernel": rng.normal(size=(32, 16)).astype(ml_dtypes.bfloat16),
        "a/scale": rng.normal(size=(8,)).astype(np.float32),
    }
    write_t5x(str(tmp_path / "checkpoint_5"), params, step=5)
    assert os.path.isdir(tmp_path / "checkpoint_5" / "target.a.b.kernel")  # zarr, not inline
    ckpt = T5XCheckpoint(str(tmp_path / "checkpoint_5"))
    assert ckpt.step == 5
    for key, arr in params.items():
        np.testing.assert_array_equal(ckpt.read(key), arr)
        assert ckpt.read(key).dtype == arr.dtype
