"""Fashion-MNIST: the IDX reader (against files written here byte by byte from the format's
definition), the splits, the grain pipeline's state and per-process rows, and clear errors."""

import gzip
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from sparse_upcycle.data import DataUnavailable, make_pipeline
from sparse_upcycle.data import fashion_mnist as fm
from sparse_upcycle.models import vit

REAL = os.path.isfile(os.path.join(fm.DEFAULT_DIR, "train-labels-idx1-ubyte.gz"))


def _write_idx(path, array: np.ndarray, code: int = 0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(">u1" if code == 0x08 else array.dtype).tobytes()
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    n_train, n_test = fm.NUM_VALIDATION + 64, 32
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(d / fm.FILES[part][0], images)
        _write_idx(d / fm.FILES[part][1], labels)
    return str(d)


def _data(d, batch=8, **kw):
    return ml_collections.ConfigDict(
        {"name": "fashion_mnist", "batch_size": batch, "data_dir": d, **kw}
    )


def test_idx_reader_matches_the_bytes(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", a)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == b"\x00\x00\x00\x02"
    np.testing.assert_array_equal(fm.read_idx(str(tmp_path / "a.idx")), a)
    b = np.array([1.5, -2.0], np.float32)
    _write_idx(tmp_path / "b.idx.gz", b.astype(">f4"), code=0x0D)
    np.testing.assert_array_equal(fm.read_idx(str(tmp_path / "b.idx.gz")), b)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x08\x00\x08\x01\x00\x00\x00\x02ab", "bad magic number"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05ab", "IDX header says (5,)"),
        (b"\x00\x00", "bad magic number"),
    ],
)
def test_corrupt_idx_is_a_clear_error(tmp_path, payload, message):
    (tmp_path / "x.idx").write_bytes(payload)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fm.read_idx(str(tmp_path / "x.idx"))
    (tmp_path / "y.idx.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        fm.read_idx(str(tmp_path / "y.idx.gz"))


def test_splits_and_normalisation(fake_dir):
    train = fm.FashionMnistSource("train", fake_dir)
    val = fm.FashionMnistSource("validation", fake_dir)
    test = fm.FashionMnistSource("test", fake_dir)
    assert (len(train), len(val), len(test)) == (64, fm.NUM_VALIDATION, 32)
    images = fm.read_idx(os.path.join(fake_dir, fm.FILES["train"][0]))
    ex = val[3]  # validation = the last NUM_VALIDATION training images
    expected = (images[64 + 3].astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(ex["image"][..., 0], expected, rtol=1e-6)
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.float32
    assert int(ex["label"]) == (64 + 3) % 10


def test_pipeline_resumes_and_shards_by_process(fake_dir):
    cfg = vit.config("tiny")
    p = make_pipeline(_data(fake_dir), "vit", cfg, "train")
    for _ in range(3):
        next(p)
    state = p.get_state()
    want = [next(p) for _ in range(10)]  # crosses an epoch (64 examples = 8 batches)
    q = make_pipeline(_data(fake_dir), "vit", cfg, "train")
    q.set_state(state)
    for a in want:
        b = next(q)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # A new permutation each epoch, every example once per epoch.
    full = make_pipeline(_data(fake_dir), "vit", cfg, "train")
    epoch = [next(full) for _ in range(16)]
    first = np.concatenate([b["image"] for b in epoch[:8]]).reshape(64, -1)
    second = np.concatenate([b["image"] for b in epoch[8:]]).reshape(64, -1)
    assert not np.array_equal(first, second)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))
    # Two processes: their rows, stacked, are the one-process global batch.
    parts = [
        make_pipeline(_data(fake_dir), "vit", cfg, "train", process_index=i, process_count=2)
        for i in range(2)
    ]
    glob = make_pipeline(_data(fake_dir), "vit", cfg, "train")
    for _ in range(5):
        g = next(glob)
        rows = np.concatenate([next(pp)["image"] for pp in parts])
        np.testing.assert_array_equal(rows, g["image"])


def test_batched_indexing_gives_the_rows_one_at_a_time_would(fake_dir):
    """The pipeline gathers a batch with one index array; the same chain over row-by-row
    reads (grain's own per-element batching) gives the same batches, bit for bit."""
    from sparse_upcycle.data.pipeline import GrainPipeline

    class RowByRow:  # the source without batch_indexing: one __getitem__ per example
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, index):
            return self.source[int(index)]

    for split, seed in (("train", 3), ("validation", None)):
        source = fm.FashionMnistSource(split, fake_dir)
        assert source.batch_indexing
        fast, slow = (
            GrainPipeline(s, 16, process_index=1, process_count=2, shuffle_seed=seed)
            for s in (source, RowByRow(source))
        )
        for n in (0, 1, 7, 12):  # 12 is past the first epoch of the 64 training examples
            fast.set_state({"next_batch": n})
            slow.set_state({"next_batch": n})
            a, b = next(fast), next(slow)
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
                np.testing.assert_array_equal(a[key], b[key])


def test_validation_batches_are_the_same_every_time(fake_dir):
    cfg = vit.config("tiny")
    a = next(make_pipeline(_data(fake_dir), "vit", cfg, "validation"))
    b = next(make_pipeline(_data(fake_dir, seed=5), "vit", cfg, "validation"))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], (64 + np.arange(8)) % 10)  # in file order


def test_missing_data_and_wrong_model_are_clear_errors(tmp_path, fake_dir):
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        make_pipeline(_data(str(tmp_path)), "vit", vit.config("tiny"), "train")
    with pytest.raises(ValueError, match="28x28x1"):
        make_pipeline(_data(fake_dir), "vit", vit.config("Ti/16"), "train")
    with pytest.raises(ValueError, match="image data set"):
        make_pipeline(_data(fake_dir), "t5", None, "train")


def test_cli_train_without_the_package_exits_2(tmp_path):
    config = os.path.join(os.path.dirname(__file__), "configs", "train_tiny.py") + ":vit-dense"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_upcycle",
            "train",
            "--config",
            config,
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.name=fashion_mnist",
            f"--config.data.data_dir={tmp_path}/nowhere",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], out.stderr


@pytest.mark.skipif(not REAL, reason="dataset-fashion-mnist is not installed")
def test_the_real_data_set():
    train, val, test = (fm.load_split(s) for s in ("train", "validation", "test"))
    assert [len(x[0]) for x in (train, val, test)] == [55_000, 5_000, 10_000]
    assert train[0].shape[1:] == (28, 28) and train[0].dtype == np.uint8
    # Published facts of the release: the test set has 1,000 images per class, and the
    # first training image is an ankle boot (class 9).
    np.testing.assert_array_equal(np.bincount(test[1]), [1000] * 10)
    assert int(train[1][0]) == 9
    pixels = np.concatenate([train[0], val[0]]).astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(fm.MEAN, abs=5e-4)
    assert pixels.std() == pytest.approx(fm.STD, abs=5e-4)
