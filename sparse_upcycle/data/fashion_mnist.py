"""Fashion-MNIST (Xiao et al. 2017) from the Debian package ``dataset-fashion-mnist``.

The package installs the four gzipped IDX files of the original release under
``/usr/share/datasets/fashion-mnist`` (MIT licence). IDX (LeCun's MNIST format): a big-endian
header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the data;
images are ``uint8 [N, 28, 28]``, labels ``uint8 [N]``.

Splits: ``train`` is the first 55,000 training images, ``validation`` the last 5,000 (the
split TFDS and big_vision use for MNIST-style sets), ``test`` the 10,000 test images. Pixels
become float32 ``x / 255``, normalised with the training set's mean and standard deviation
(0.2860, 0.3530), shape ``[28, 28, 1]``. Training batches are shuffled each epoch; nothing is
downloaded.
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from sparse_upcycle import models
from sparse_upcycle.data.pipeline import DataUnavailable, GrainPipeline

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_VALIDATION = 5000
# The ``data`` fields make_fashion_mnist_pipeline reads (besides name, batch_size, seed).
DATA_FIELDS = frozenset({"data_dir"})
MEAN, STD = 0.2860, 0.3530
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (gzipped or not) as a numpy array; ``ValueError`` if it is malformed."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def load_split(split: str, data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int32 [N])`` of ``train``/``validation``/``test``."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train, validation or test, got {split!r}")
    part = "test" if split == "test" else "train"
    paths = [os.path.join(data_dir, name) for name in FILES[part]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataUnavailable(f"Fashion-MNIST not found ({missing[0]}); install it with: {INSTALL}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{data_dir}: images {images.shape} and labels {labels.shape} do not match"
        )
    if part == "train":
        if len(images) <= NUM_VALIDATION:
            raise ValueError(f"{data_dir}: only {len(images)} training images")
        cut = slice(None, -NUM_VALIDATION) if split == "train" else slice(-NUM_VALIDATION, None)
        images, labels = images[cut], labels[cut]
    return images, labels.astype(np.int32)


class FashionMnistSource:
    """Random access to one split: ``{"image": float32 [28, 28, 1], "label": int32}``; an
    index array gives a batch of them (``batch_indexing``)."""

    batch_indexing = True

    def __init__(self, split: str, data_dir: str = DEFAULT_DIR):
        self.images, self.labels = load_split(split, data_dir)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image = (self.images[index].astype(np.float32) / 255.0 - MEAN) / STD
        return {"image": image[..., None], "label": self.labels[index]}


def make_fashion_mnist_pipeline(
    data_config, family: str, model_config, split: str, *, process_index=0, process_count=1
) -> GrainPipeline:
    if models.get(family).TASK != "images":
        raise ValueError(f"fashion_mnist is an image data set; model family is {family!r}")
    if tuple(model_config.image_size) != (28, 28) or model_config.num_channels != 1:
        raise ValueError(
            f"fashion_mnist images are 28x28x1; the model expects {tuple(model_config.image_size)}"
            f"x{model_config.num_channels} (use a '<size>/<patch>-28' ViT)"
        )
    if model_config.num_classes != 10:
        raise ValueError(f"fashion_mnist has 10 classes; the model has {model_config.num_classes}")
    source = FashionMnistSource(split, data_config.get("data_dir", DEFAULT_DIR))
    return GrainPipeline(
        source,
        data_config.batch_size,
        process_index=process_index,
        process_count=process_count,
        shuffle_seed=data_config.get("seed", 0) if split == "train" else None,
    )
