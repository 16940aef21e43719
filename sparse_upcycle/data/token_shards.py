"""A corpus you bring: token shards on disk, for T5 (span corruption) and decoders (packed LM).

On-disk format (one directory; ``sparse-upcycle tokenize`` writes it from a
directory of text, see ``text_to_shards.py``; shards tokenised elsewhere only need a manifest,
``write_manifest``)::

    DIR/
      manifest.json         what is below; the only file the pipeline trusts
      train-00000.npy       1-D numpy arrays of token ids (``np.save``), read memory-mapped
      train-00001.npy
      validation-00000.npy
      tokenizer.json        optional: a copy of the tokenizer the shards were made with

``manifest.json``::

    {"format": "sparse_upcycle.token_shards", "version": 1,
     "dtype": "uint16",            # of every shard: uint16 | uint32 | int32
     "vocab_size": 32000,          # ids are < vocab_size; the model's vocabulary must hold it
     "eos_id": 2,                  # ends every document
     "tokenizer": {"file": "tokenizer.json", "sha256": "<hex>"},   # or null
     "sentinels": {"first": 32099, "count": 100},                   # or null (T5 only)
     "splits": {"train": {"tokens": 123456, "documents": 80,
                          "shards": [{"file": "train-00000.npy", "tokens": 100000}, ...]},
                "validation": {...}, "test": {...}}}

Each split is one token *stream*: its shards concatenated in the listed order (documents,
each ending with ``eos_id``, run across shard boundaries). Shard files are plain names inside
``DIR`` (no sub-directories, no links out of it); every shard's dtype, rank and length are
checked against the manifest when the pipeline opens it.

Examples are what ``text.py`` makes of its own streams, from the same classes:

* decoder (``lm``): example ``i`` is the window ``stream[i·S : i·S + S + 1]`` (S = ``seq_len``),
  ``tokens = w[:-1]``, ``targets = w[1:]``, ``weights`` all 1 (``text.PackedLMSource``);
* T5 (``seq2seq``): span corruption of ``stream[i·L : (i+1)·L]`` (``text.SpanCorruptionSource``,
  T5's ``random_spans_helper`` lengths; padding id 0, as T5's vocabulary). Sentinel ``k`` is
  ``sentinels.first - k`` when the tokenizer has T5's ``<extra_id_k>`` tokens, otherwise
  ``vocab_size + extra_ids - 1 - k`` (``data.extra_ids`` ids above the tokenizer's, which the
  model's vocabulary must hold).

Batching, per-process sharding, shuffling and the JSON state are ``GrainPipeline``'s
(``pipeline.py``): the train split is reshuffled each epoch, validation and test are not.

``data`` fields (``data.name = "token_shards"``): ``path`` (the directory; required),
``tokenizer`` (optional path of a tokenizer.json whose sha256 must equal the manifest's, e.g.
the checkpoint's own), ``seq_len`` (512), ``target_len`` (T5; computed), ``noise_density``
(0.15), ``mean_noise_span_length`` (3.0), ``extra_ids`` (100), ``seed`` (0), ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import numpy as np

from sparse_upcycle import models
from sparse_upcycle.data import corpus, text
from sparse_upcycle.data.pipeline import DataUnavailable, GrainPipeline

FORMAT, VERSION = "sparse_upcycle.token_shards", 1
MANIFEST = "manifest.json"
DTYPES = ("uint16", "uint32", "int32")
SPLITS = corpus.SPLITS
COMMAND = "sparse-upcycle tokenize"
# The ``data`` fields make_token_shards_pipeline reads (besides name, batch_size, seed).
DATA_FIELDS = frozenset(
    {
        "path",
        "tokenizer",
        "seq_len",
        "target_len",
        "noise_density",
        "mean_noise_span_length",
        "extra_ids",
    }
)


def make_command(out: str = "DIR") -> str:
    """The command that writes shards at ``out`` (quoted in error messages)."""
    return f"{COMMAND} --src TEXT_DIR --tokenizer TOKENIZER.json --out {out}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading: the manifest and the memory-mapped shards
# ----------------------------------------------------------------------------------------------


class ShardedStream:
    """The concatenation of 1-D token arrays, read by contiguous slices (``text.TokenStream``)
    without copying more than the slice; a slice may span any number of shards."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0, *(len(s) for s in self.shards)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice, /) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a ShardedStream is read by slices")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a ShardedStream is read by contiguous slices (step 1)")
        pieces = []
        while start < stop:
            k = int(np.searchsorted(self.offsets, start, side="right")) - 1
            end = min(stop, int(self.offsets[k + 1]))
            base = int(self.offsets[k])
            pieces.append(self.shards[k][start - base : end - base])
            start = end
        if not pieces:
            dtype = self.shards[0].dtype if self.shards else np.int32
            return np.zeros(0, dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclasses.dataclass(frozen=True)
class TokenShards:
    """An opened shard directory: its checked manifest."""

    path: str
    manifest: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("tokens", 0))

    def stream(self, split: str) -> ShardedStream:
        """The split's shards, memory-mapped, each checked against the manifest."""
        entry = self.manifest["splits"].get(split, {"shards": []})
        dtype = np.dtype(self.manifest["dtype"])
        arrays = []
        for shard in entry["shards"]:
            file = os.path.join(self.path, shard["file"])
            try:
                array = np.load(file, mmap_mode="r") if shard["tokens"] else np.zeros(0, dtype)
            except (OSError, ValueError) as e:
                raise ValueError(f"{file}: not a readable .npy file ({e})") from None
            if array.ndim != 1 or array.dtype != dtype or len(array) != shard["tokens"]:
                raise ValueError(
                    f"{file}: holds {array.dtype} {list(array.shape)}, but {self.manifest_path} "
                    f"says dtype {dtype} [{shard['tokens']}]"
                )
            arrays.append(array)
        return ShardedStream(arrays)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest(m, where: str) -> None:
    """Refuse a manifest that is not the documented format, naming the field."""

    def bad(field: str, why: str):
        return ValueError(f"{where}: {field} {why}")

    if not isinstance(m, dict):
        raise ValueError(f"{where}: not a JSON object")
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        got = f"{m.get('format')!r} / {m.get('version')!r}"
        raise bad("format/version", f"must be {FORMAT!r} / {VERSION}, got {got}")
    if m.get("dtype") not in DTYPES:
        raise bad("dtype", f"must be one of {', '.join(DTYPES)}, got {m.get('dtype')!r}")
    for field in ("vocab_size", "eos_id"):
        if not _is_count(m.get(field)):
            raise bad(field, f"must be an int >= 0, got {m.get(field)!r}")
    if not 0 <= m["eos_id"] < m["vocab_size"]:
        raise bad("eos_id", f"{m['eos_id']} is not below vocab_size {m['vocab_size']}")
    if np.iinfo(np.dtype(m["dtype"])).max < m["vocab_size"] - 1:
        raise bad("dtype", f"{m['dtype']} cannot hold ids up to vocab_size - 1")
    tok = m.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("sha256"), str)):
        raise bad("tokenizer", 'must be null or {"file": ..., "sha256": "<hex>"}')
    sentinels = m.get("sentinels")
    if sentinels is not None:
        ok = isinstance(sentinels, dict) and set(sentinels) == {"first", "count"}
        if not ok or not all(map(_is_count, sentinels.values())):
            raise bad("sentinels", 'must be null or {"first": int, "count": int}')
        if not sentinels["count"] - 1 <= sentinels["first"] < m["vocab_size"]:
            raise bad("sentinels", f"{sentinels} do not fit vocab_size {m['vocab_size']}")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("splits", "must be an object of splits (train, validation, test)")
    for split, entry in splits.items():
        field = f"splits.{split}"
        if split not in SPLITS:
            raise bad(field, f"is not a split; known: {', '.join(SPLITS)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise bad(field, 'must be {"tokens": int, "shards": [{"file", "tokens"}, ...]}')
        for i, shard in enumerate(entry["shards"]):
            name = shard.get("file") if isinstance(shard, dict) else None
            if not isinstance(name, str) or not _is_count(shard.get("tokens")):
                raise bad(f"{field}.shards[{i}]", 'must be {"file": str, "tokens": int}')
            if name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
                raise bad(f"{field}.shards[{i}].file", f"{name!r} is not a plain file name")
        total = sum(s["tokens"] for s in entry["shards"])
        if entry.get("tokens") != total:
            raise bad(f"{field}.tokens", f"is {entry.get('tokens')!r}, its shards hold {total}")


def open_shards(path: str | os.PathLike) -> TokenShards:
    """The shard directory ``path``, its manifest checked (shards are checked when read)."""
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        what = "no directory" if not os.path.isdir(path) else f"no {MANIFEST} in it"
        raise DataUnavailable(
            f"token shards not found at {path} ({what}); write them with: {make_command(path)}"
        )
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path}: not readable JSON ({e})") from None
    _check_manifest(manifest, manifest_path)
    root = os.path.realpath(path)
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            real = os.path.realpath(os.path.join(path, shard["file"]))
            if os.path.dirname(real) != root:  # a link out of the directory
                raise ValueError(f"{manifest_path}: shard {shard['file']!r} is outside {path}")
    return TokenShards(path, manifest)


# ----------------------------------------------------------------------------------------------
# Writing the manifest (the tokeniser uses it; so can shards made elsewhere)
# ----------------------------------------------------------------------------------------------


def write_manifest(
    path: str | os.PathLike,
    shards: dict[str, list[str]],
    *,
    vocab_size: int,
    eos_id: int,
    documents: dict[str, int] | None = None,
    tokenizer: dict | None = None,
    sentinels: dict | None = None,
) -> dict:
    """Write ``path/manifest.json`` for the ``.npy`` shards already in ``path`` (split ->
    file names, in stream order), counting their tokens; returns the manifest. ``ValueError``
    when the shards disagree on dtype or are not 1-D."""
    path = os.fspath(path)
    dtypes, splits = set(), {}
    for split, files in shards.items():
        entries = []
        for name in files:
            array = np.load(os.path.join(path, name), mmap_mode="r")
            if array.ndim != 1:
                raise ValueError(f"{os.path.join(path, name)}: shape {array.shape} is not 1-D")
            dtypes.add(array.dtype.name)
            entries.append({"file": name, "tokens": int(len(array))})
        splits[split] = {
            "tokens": sum(e["tokens"] for e in entries),
            "documents": (documents or {}).get(split),
            "shards": entries,
        }
    if len(dtypes) > 1:
        raise ValueError(f"{path}: shards of several dtypes ({', '.join(sorted(dtypes))})")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtypes.pop() if dtypes else "uint32",
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "tokenizer": tokenizer,
        "sentinels": sentinels,
        "splits": splits,
    }
    _check_manifest(manifest, os.path.join(path, MANIFEST))
    tmp = os.path.join(path, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(path, MANIFEST))
    return manifest


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def _get(data_config, name: str, kind: type | tuple[type, ...], default, what: str):
    """``data.<name>`` of type ``kind`` (bools are not numbers), else one line naming it."""
    value = data_config.get(name, default)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError(f"data.{name} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _first_sentinel(shards: TokenShards, extra_ids: int, model_vocab: int) -> int:
    sentinels = shards.manifest.get("sentinels")
    if sentinels and sentinels["count"] > 0:
        return int(sentinels["first"])
    needed = shards.vocab_size + extra_ids
    if model_vocab < needed:
        raise ValueError(
            f"model vocab_size {model_vocab} cannot hold the shards' vocabulary + sentinels "
            f"({shards.vocab_size} + data.extra_ids {extra_ids} = {needed}); the tokenizer has "
            "no <extra_id_k> tokens"
        )
    return needed - 1


def _span_settings(data_config, seq_len: int, shards: TokenShards, model_config) -> dict:
    """``text.SpanCorruptionSource``'s settings from the ``data`` fields (T5)."""
    density = _get(data_config, "noise_density", (int, float), 0.15, "a number")
    mean_span = _get(data_config, "mean_noise_span_length", (int, float), 3.0, "a number")
    extra_ids = _get(data_config, "extra_ids", int, 100, "an int")
    if not 0 < density < 1 or mean_span < 1:
        raise ValueError(
            "data.noise_density must be in (0, 1) and data.mean_noise_span_length >= 1, got "
            f"{density} and {mean_span}"
        )
    tokens_length, needed_targets = text.random_spans_helper(seq_len, density, mean_span)
    target_len = data_config.get("target_len", None)
    target_len = needed_targets if target_len is None else target_len
    if isinstance(target_len, bool) or not isinstance(target_len, int):
        raise ValueError(f"data.target_len must be an int or None, got {target_len!r}")
    if target_len < needed_targets:
        raise ValueError(
            f"span corruption of data.seq_len {seq_len} needs data.target_len >= "
            f"{needed_targets}, got {target_len}"
        )
    return {
        "target_len": target_len,
        "tokens_length": tokens_length,
        "noise_density": float(density),
        "mean_noise_span_length": float(mean_span),
        "first_sentinel": _first_sentinel(shards, extra_ids, model_config.vocab_size),
    }


def _source(shards: TokenShards, split: str, seq_len: int, seed: int, span: dict | None):
    """(random-access source, per-epoch transform or None, raw tokens per example)."""
    stream = shards.stream(split)
    if span is None:
        return text.PackedLMSource(stream, seq_len), None, seq_len + 1
    source = text.SpanCorruptionSource(
        stream,
        seq_len,
        eval_seed=None if split == "train" else (seed, SPLITS[split]),
        eos_id=shards.eos_id,
        **span,
    )
    return source, source.corrupt if split == "train" else None, span["tokens_length"]


def make_token_shards_pipeline(
    data_config,
    family: str,
    model_config,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> GrainPipeline:
    """The ``split`` of the shard directory ``data.path`` for model ``family``: span corruption
    for a ``seq2seq`` family (T5), packed windows for an ``lm`` one (decoder). Building the
    train split also checks that the validation split holds one batch's first example, so a
    run does not stop at its first evaluation."""
    task = models.get(family).TASK
    if task not in ("seq2seq", "lm"):
        raise ValueError(
            f"token shards are for seq2seq and language-model families, not {family!r}"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    path = _get(data_config, "path", str, "", "a directory (string)")
    if not path:
        raise ValueError(
            f"data.path is not set: the token shard directory, written by {make_command()}"
        )
    tokenizer = _get(data_config, "tokenizer", str, "", "a tokenizer.json path (string)")
    seed = _get(data_config, "seed", int, 0, "an int")
    seq_len = _get(data_config, "seq_len", int, 512, "an int")
    batch = _get(data_config, "batch_size", int, None, "an int")
    if seq_len < (1 if task == "lm" else 3):
        raise ValueError(f"data.seq_len must be >= {1 if task == 'lm' else 3}, got {seq_len}")
    if batch < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch}")

    shards = open_shards(path)
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise ValueError(f"data.tokenizer {tokenizer} is not a file")
        made_with = (shards.manifest.get("tokenizer") or {}).get("sha256")
        if made_with is None:
            raise ValueError(f"data.tokenizer is set but {shards.manifest_path} names no tokenizer")
        if file_sha256(tokenizer) != made_with:
            raise ValueError(
                f"data.tokenizer {tokenizer} is not the tokenizer the shards at {path} were made "
                f"with (sha256 differs from {shards.manifest_path})"
            )
    if model_config.vocab_size < shards.vocab_size:
        raise ValueError(
            f"model vocab_size {model_config.vocab_size} is smaller than the shards' vocabulary "
            f"({shards.vocab_size}, {shards.manifest_path})"
        )

    span = None if task == "lm" else _span_settings(data_config, seq_len, shards, model_config)
    for s in (split, "validation") if split == "train" else (split,):
        src, _, window = _source(shards, s, seq_len, seed, span)
        if len(src) == 0:
            raise ValueError(
                f"the {s} split of {shards.manifest_path} has {shards.tokens(s)} tokens, fewer "
                f"than one window of data.seq_len {seq_len} needs ({window})"
            )
    src, transform, _ = _source(shards, split, seq_len, seed, span)
    return GrainPipeline(
        src,
        batch,
        process_index=process_index,
        process_count=process_count,
        shuffle_seed=seed if split == "train" else None,
        transform=transform,
        transform_seed=seed,
    )


if __name__ == "__main__":
    from sparse_upcycle.data import text_to_shards

    sys.exit(text_to_shards.main())
