"""Hugging Face checkpoints: ``config.json`` + safetensors (single file or sharded with
``model.safetensors.index.json``), for T5, ViT and Llama-family models.

Tensors are opened lazily with ``safetensors.safe_open`` and renamed into our parameter paths
by the per-model maps (``hf_t5``, ``hf_vit``, ``hf_llama``), whose docstrings hold the
name/transpose tables. ``pytorch_model.bin`` is refused: loading it means unpickling.
``ShardedSafetensorsWriter`` writes the same layout (``export --format hf``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import numpy as np
from safetensors import safe_open

from sparse_upcycle import models
from sparse_upcycle.checkpoints.chunked import Chunked
from sparse_upcycle.checkpoints.errors import CheckpointError
from sparse_upcycle.checkpoints.paths import check_entries, contained, source_root
from sparse_upcycle.checkpoints.reader import InMemoryReader
from sparse_upcycle.checkpoints.tree import flatten

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_hf(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


class LazySafetensors(Mapping):
    """``{hf_name: array}`` over one or more safetensors files, read on access. Every file
    (the index, each shard it names) must resolve inside the model directory, or inside the
    hub cache entry of a snapshot (``paths.source_root``); checked here, before any is read."""

    def __init__(self, directory: str):
        root = source_root(directory)
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            real_index = contained(index, root, index)
            try:
                with open(real_index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointError(
                    f"{index}: weight_map must be an object of tensor name -> shard file name"
                )
            self._files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
            checked: set[str] = set()
            for name, file in weight_map.items():
                if file not in checked:
                    entry = f"{index}: weight_map[{name!r}] = {file!r}"
                    contained(os.path.join(directory, file), root, entry)
                    checked.add(file)
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            file = os.path.join(directory, SINGLE)
            real_file = contained(file, root, file)
            try:
                with safe_open(real_file, framework="numpy") as f:
                    self._files = {name: file for name in f.keys()}
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        elif any(n.endswith(".bin") for n in os.listdir(directory)):
            raise CheckpointError(
                f"{directory}: only pytorch_model.bin found. Loading it means unpickling, which "
                "this tool never does; convert it to safetensors first (transformers: "
                "model.save_pretrained(dir, safe_serialization=True))"
            )
        else:
            raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._with_file(name, lambda f: f.get_tensor(name), f"cannot read {name!r}")

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header, without reading the tensor."""
        return self._with_file(
            name, lambda f: tuple(f.get_slice(name).get_shape()), f"cannot read {name!r}'s header"
        )

    def _with_file(self, name: str, read, what: str):
        """``read(f)`` on the safetensors file holding ``name`` (CheckpointError naming it)."""
        file = self._files[name]
        try:
            with safe_open(file, framework="numpy") as f:
                return read(f)
        except FileNotFoundError:
            raise CheckpointError(
                f"{file}: missing safetensors shard (listed in the index)"
            ) from None
        except Exception as e:
            raise CheckpointError(f"{file}: {what} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def supported_model_types() -> list[str]:
    """The ``config.json`` ``model_type`` values some registered family's HF map reads."""
    return sorted({t for name in models.names() for t in models.get(name).HF_MODEL_TYPES})


class HFCheckpoint(InMemoryReader):
    """A Hugging Face model directory, read into our paths; ``config`` (= ``model_config``) is
    our model config, ``family`` the registered family whose HF map reads its ``model_type``,
    ``model_family`` that map's name (``llama`` for Llama, Mistral, Mixtral, Qwen2 and Qwen3),
    ``tensors`` the safetensors by HF name and ``hf_config`` its ``config.json``."""

    def __init__(self, path: str):
        if not is_hf(path):
            raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
        # The files read (config.json, the safetensors) and those copied along (tokenizer,
        # generation config…: layout.save_hf_source) all resolve inside the model directory.
        check_entries(path, source_root(path))
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                self.hf_config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}/config.json: unreadable ({e})") from None
        if not isinstance(self.hf_config, dict):
            raise CheckpointError(
                f"{path}/config.json: must hold a JSON object, got {type(self.hf_config).__name__}"
            )
        hf_type = self.hf_config.get("model_type")
        family = models.for_hf_model_type(hf_type)
        if family is None:
            raise CheckpointError(
                f"{path}: model_type {hf_type!r} is not supported; supported: "
                f"{supported_model_types()}"
            )
        maps = self.maps = models.hf_map(family)
        self.model_family = maps.__name__.rpartition(".")[2].removeprefix("hf_")
        tensors = self.tensors = LazySafetensors(path)  # refuses .bin-only, broken dirs first
        self._lazy: dict[str, tuple[str, bool]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        try:
            config = maps.config_from_hf(self.hf_config)
            lazy = getattr(maps, "lazy_from_hf", lambda sd, c: None)(tensors, config)
            if lazy is not None:  # a dense model: each tensor read when asked for
                self._lazy = lazy
                self._flat = {}
                self._plan_shapes(maps, config)
            else:
                params = maps.from_hf(tensors, config)
                self._flat = {k: np.asarray(v) for k, v in flatten(params).items()}
        except CheckpointError:
            raise
        except KeyError as e:
            raise CheckpointError(f"{path}: missing {e} (in config.json or the tensors)") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        super().__init__(
            os.path.abspath(path), "hf", config=config, model_config=config, family=family
        )

    def _plan_shapes(self, maps, config) -> None:
        """Every lazily read tensor's shape, from the file headers, checked against the
        config's before anything is read (ValueError naming the first that differs)."""
        want = {k: tuple(v.shape) for k, v in flatten(maps.abstract_params(config)).items()}
        for key, (name, transpose) in self._lazy.items():
            shape = self.tensors.shape(name)
            self._shapes[key] = shape[::-1] if transpose else shape
            if key not in want or self._shapes[key] != want[key]:
                raise ValueError(
                    f"{name} has shape {shape}; the config ({key}) expects "
                    f"{want.get(key, 'no such tensor')}"
                    + (" transposed" if transpose and key in want else "")
                )

    def keys(self) -> list[str]:
        return sorted(self._lazy) if self._lazy else super().keys()

    def __contains__(self, key: str) -> bool:
        return key in self._lazy or super().__contains__(key)

    def read(self, key: str) -> np.ndarray:
        if key in self._lazy:
            return self.maps.read_lazy(self.tensors, *self._lazy[key])
        return super().read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key] if key in self._shapes else super().shape(key)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32) if key in self._lazy else super().dtype(key)


# --------------------------------------------------------------------------------------------
# Writing safetensors.
# --------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """``"5GB"`` (10⁹), ``"500MiB"`` (2²⁰), ``"20KB"``, or a byte count, as transformers'
    ``max_shard_size`` reads them."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(float(m[1]) * scale[unit])
    if size < 1:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


# numpy dtype name -> safetensors dtype code (the format's spec, huggingface/safetensors)
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
HEADER_RESERVE = 1 << 20  # bytes kept at a shard's start for its JSON header


class _WriteBehind:
    """File writes on a thread of their own, so that the next tensor is made while the last
    is written (file writes release the GIL); at most ``depth`` buffers wait. A failed write
    is raised, as it was, by the next ``write`` or by ``drain``."""

    def __init__(self, depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safetensors-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0].write(item[1])
            except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def write(self, file: BinaryIO, data) -> None:
        self._raise()
        self._queue.put((file, data))

    def drain(self) -> None:
        """Wait for every write so far (then the file may be sought, closed or renamed)."""
        self._queue.join()
        self._raise()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


class ShardedSafetensorsWriter:
    """Tensors in order into safetensors shards of at most ``max_bytes`` (a larger tensor gets
    a shard of its own), then renamed as ``save_pretrained`` names them, with the index.

    Streamed: each tensor's bytes go to the open shard file as it is added, after room kept
    for the header (``HEADER_RESERVE``); closing a shard writes its header there, padded with
    spaces as the format allows (a header that outgrew the room is written in front of a copy
    of the data instead). The writes run on a thread of their own (``_WriteBehind``), so memory
    holds the tensor being made and at most two being written, not a shard."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self._writes = _WriteBehind()
        self._file: BinaryIO | None = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray | Chunked) -> None:
        if name in self._entries or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if not isinstance(array, Chunked):
            array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        code = SAFETENSORS_DTYPES.get(array.dtype.name)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code")
        if self._entries and self._offset + array.nbytes > self.max_bytes:
            self._close_shard()
        if self._file is None:
            path = os.path.join(self.directory, f".shard-{len(self._shards)}.safetensors")
            self._file = open(path, "wb")  # noqa: SIM115  (closed in _close_shard)
            self._file.seek(8 + HEADER_RESERVE)
        if isinstance(array, Chunked):
            written = 0
            for part in array.parts():
                part = np.ascontiguousarray(part, dtype=array.dtype)
                self._writes.write(self._file, part.reshape(-1).view(np.uint8).data)
                written += part.nbytes
            if written != array.nbytes:
                raise ValueError(
                    f"tensor {name!r}: its parts hold {written} bytes, not {array.nbytes}"
                )
        else:
            self._writes.write(self._file, array.reshape(-1).view(np.uint8).data)
        end = self._offset + array.nbytes
        self._entries[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [self._offset, end],
        }
        self._offset = end
        self.total_bytes += array.nbytes

    def _close_shard(self) -> None:
        self._writes.drain()
        if self._file is None:  # a shard with no tensor at all (an empty model)
            path = os.path.join(self.directory, f".shard-{len(self._shards)}.safetensors")
            self._file = open(path, "wb")  # noqa: SIM115
            self._file.seek(8 + HEADER_RESERVE)
        header = {"__metadata__": {"format": "pt"}, **self._entries}
        text = json.dumps(header, separators=(",", ":")).encode()
        f, self._file = self._file, None
        if len(text) <= HEADER_RESERVE:
            f.seek(0)
            f.write(len(text.ljust(HEADER_RESERVE)).to_bytes(8, "little"))
            f.write(text.ljust(HEADER_RESERVE))
            f.close()
        else:
            f.close()
            _prepend_header(f.name, text)
        self._shards.append(list(self._entries))
        self._entries, self._offset = {}, 0

    def abort(self) -> None:
        """After a failure: let the pending writes go and close the open shard (the caller
        removes the directory)."""
        try:
            self._writes.drain()
        except BaseException:  # noqa: BLE001  (the failure being handled comes first)
            pass
        self._writes.stop()
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the file names."""
        try:
            if self._file is not None or not self._shards:
                self._close_shard()
        finally:
            self._writes.stop()
        n = len(self._shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, name in enumerate(names):
            os.rename(
                os.path.join(self.directory, f".shard-{i}.safetensors"),
                os.path.join(self.directory, name),
            )
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t: names[i] for i, shard in enumerate(self._shards) for t in shard},
            }
            with open(
                os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8"
            ) as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def _prepend_header(path: str, text: bytes) -> None:
    """Rewrite ``path`` (data after ``HEADER_RESERVE`` bytes of room) with ``text`` as its
    header, copying the data in chunks."""
    import shutil

    padded = text.ljust(-(-len(text) // 8) * 8)
    tmp = path + ".tmp"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(len(padded).to_bytes(8, "little"))
        dst.write(padded)
        src.seek(8 + HEADER_RESERVE)
        shutil.copyfileobj(src, dst, 64 << 20)
    os.replace(tmp, path)
