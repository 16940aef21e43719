"""The text corpus, its splits, its vocabulary and its cached token streams, shared by the
span-corruption and packed-LM pipelines (``text.py``) and by ``inspect --routing``.

Corpus: the Python 3.11 documentation sources shipped by the Debian package ``python3.11-doc``
(497 reStructuredText files, ~11 MB, PSF License; see /usr/share/doc/python3.11/copyright).
Every ``*.txt`` file under ``corpus_dir`` is one document.

* **Splits are by document**: bucket = first 8 hex digits of sha256(relative path) mod 100;
  buckets 0-4 are validation, 5-9 test, the rest train. No document straddles two splits.
* **Vocabulary**: a SentencePiece unigram model trained locally on the train documents only,
  with T5's special ids (pad 0, eos 1, unk 2, no bos), single-threaded and unshuffled so that
  the same corpus always gives the same model. Each split is then one int32 *stream*: its
  documents (sorted by path) encoded and concatenated, each followed by EOS = 1. The model and
  the streams are cached under ``cache_dir/text/<corpus sha256>-<pieces>/``; every file or
  directory there is written under a temporary name and renamed, so a killed run leaves no
  half-written cache.
* **Document selection** (``include_documents`` / ``exclude_documents``: lists of
  ``fnmatch`` patterns on the relative path, e.g. ``["library/*"]``): every split keeps only
  the documents that match an included pattern (all, when none is given) and no excluded one,
  concatenated in path order; the vocabulary stays the whole corpus's, so models trained on
  different selections share token ids (Branch-Train-MiX's domain branches). The cache holds
  each split's per-document token counts (``{split}.docs.json``) to cut a selection out of
  its stream.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from sparse_upcycle.data.pipeline import DataUnavailable

log = logging.getLogger("sparse_upcycle.data.corpus")

CORPUS_DIR = "/usr/share/doc/python3.11/html/_sources"
SPLITS = {"train": 0, "validation": 1, "test": 2}
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_CACHE_FORMAT = 1  # bump when the vocabulary settings or the cache layout change


# ----------------------------------------------------------------------------------------------
# Documents and splits
# ----------------------------------------------------------------------------------------------


def list_documents(
    corpus_dir: str | os.PathLike, pattern: str = "*.txt", skip_dirs: frozenset[str] = frozenset()
) -> list[str]:
    """Sorted relative paths (``/``-separated) of the files matching ``pattern`` anywhere under
    ``corpus_dir``, leaving out those below a directory named in ``skip_dirs``."""
    root = pathlib.Path(corpus_dir)
    docs = sorted(
        rel.as_posix()
        for rel in (p.relative_to(root) for p in root.rglob(pattern) if p.is_file())
        if not skip_dirs.intersection(rel.parts[:-1])
    )
    if not docs:
        hint = (
            "install it with: apt-get install python3.11-doc"
            if pattern == "*.txt"
            else f"no {pattern} file is there"
        )
        raise DataUnavailable(f"text corpus not found at {root}; {hint}")
    return docs


def split_of(relpath: str) -> str:
    """The split a document belongs to, from a hash of its relative path alone."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "validation" if bucket < 5 else "test" if bucket < 10 else "train"


def default_cache_dir() -> str:
    return os.environ.get("SPARSE_UPCYCLE_CACHE") or os.path.expanduser("~/.cache/sparse_upcycle")


# ----------------------------------------------------------------------------------------------
# Vocabulary and token streams (cached)
# ----------------------------------------------------------------------------------------------


def _train_vocab(lines: list[str], vocab_size: int) -> bytes:
    """Serialized SentencePiece unigram model with T5's special ids; the same bytes for the
    same input (no file names are recorded in it)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,  # use every line, in order: no sampling, no shuffling
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def prepare_corpus(
    corpus_dir: str | os.PathLike,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    *,
    pattern: str = "*.txt",
    skip_dirs: frozenset[str] = frozenset(),
    vocab_from: pathlib.Path | None = None,
) -> pathlib.Path:
    """The cache entry holding ``spm.model`` and ``{split}.npy``; builds what is missing.

    ``pattern`` / ``skip_dirs``: which files are documents (``list_documents``).
    ``vocab_from``: another entry whose vocabulary encodes this corpus instead of one trained
    on it (a downstream corpus read with the pre-training vocabulary, ``finetune_eval.py``)."""
    root = pathlib.Path(corpus_dir)
    docs = list_documents(root, pattern, skip_dirs)
    raw = {rel: (root / rel).read_bytes() for rel in docs}
    digest = hashlib.sha256(f"format {_CACHE_FORMAT}\0".encode())
    if vocab_from is not None:  # the vocabulary is an input too
        digest.update(b"vocab\0" + (vocab_from / "spm.model").read_bytes() + b"\0")
    for rel in docs:  # the key covers names and contents, so any edit means a new entry
        digest.update(rel.encode() + b"\0" + raw[rel] + b"\0")
    entry = pathlib.Path(cache_dir) / "text" / f"{digest.hexdigest()[:16]}-{vocab_size}"
    texts = {rel: raw[rel].decode("utf-8", errors="replace") for rel in docs}
    by_split = {s: [rel for rel in docs if split_of(rel) == s] for s in SPLITS}

    if vocab_from is not None and not (entry / "spm.model").exists():

        def copy(tmp: pathlib.Path) -> None:
            for name in ("spm.model", "spm.vocab"):
                shutil.copyfile(vocab_from / name, tmp / name)

        _publish_vocab(entry, copy)
    if not (entry / "spm.model").exists():
        lines = [ln.strip() for rel in by_split["train"] for ln in texts[rel].splitlines()]
        lines = [ln for ln in lines if ln]
        size = f"{sum(len(ln.encode()) for ln in lines) / 1e6:.1f} MB"
        log.info(
            f"training a SentencePiece vocabulary of {vocab_size} pieces on {size} "
            f"({len(by_split['train'])} train documents); cached at {entry}"
        )

        def train(tmp: pathlib.Path) -> None:
            start = time.perf_counter()
            (tmp / "spm.model").write_bytes(_train_vocab(lines, vocab_size))
            sp = load_vocab(tmp)  # and the pieces as text, for people
            rows = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(len(sp))]
            (tmp / "spm.vocab").write_text("".join(rows), encoding="utf-8")
            log.info("vocabulary trained in %.1f s", time.perf_counter() - start)

        _publish_vocab(entry, train)

    sp = None
    for split, rels in by_split.items():
        path = entry / f"{split}.npy"
        index = entry / f"{split}.docs.json"
        if path.exists() and index.exists():
            continue
        if sp is None:
            sp = load_vocab(entry)
        start = time.perf_counter()
        encoded = sp.encode([texts[rel] for rel in rels])
        stream = np.array([t for ids in encoded for t in [*ids, EOS_ID]], np.int32)
        _save_npy(path, stream)
        counts = [[rel, len(ids) + 1] for rel, ids in zip(rels, encoded, strict=True)]
        _save_text(index, json.dumps(counts))
        seconds = time.perf_counter() - start
        log.info(f"tokenised {split}: {len(rels)} documents, {stream.size} tokens, {seconds:.1f} s")
    return entry


def _publish_vocab(entry: pathlib.Path, write) -> None:
    """Create the cache entry ``entry`` with the files ``write(tmp)`` puts in a temporary
    directory beside it, renamed into place: a killed run leaves no half-written entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        write(tmp)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished first; its files are the same
            if not (entry / "spm.model").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_vocab(entry: pathlib.Path):
    """The cached ``sentencepiece.SentencePieceProcessor`` (for decoding and inspection)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(entry / "spm.model"))


def load_stream(entry: pathlib.Path, split: str) -> np.ndarray:
    return np.load(entry / f"{split}.npy", mmap_mode="r")


def _patterns(value, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"data.{name} must be a list of path patterns, got {value!r}")
    return tuple(value)


def select_documents(
    entry: pathlib.Path, split: str, include=None, exclude=None
) -> tuple[np.ndarray, list[str]]:
    """(the stream of ``split`` cut down to the selected documents, their paths): documents
    matching one of ``include`` (every document when empty) and none of ``exclude``, in path
    order, each with its EOS. ValueError when a pattern list is malformed or nothing is left."""
    include = _patterns(include, "include_documents")
    exclude = _patterns(exclude, "exclude_documents")
    stream = load_stream(entry, split)
    if not include and not exclude:
        return stream, []
    with open(entry / f"{split}.docs.json", encoding="utf-8") as f:
        counts = json.load(f)
    pieces, kept, offset = [], [], 0
    for rel, n in counts:
        chosen = not include or any(fnmatch.fnmatchcase(rel, p) for p in include)
        if chosen and not any(fnmatch.fnmatchcase(rel, p) for p in exclude):
            pieces.append(stream[offset : offset + n])
            kept.append(rel)
        offset += n
    if offset != len(stream):
        raise ValueError(f"{entry}/{split}.docs.json does not describe {split}.npy; remove {entry}")
    if not kept:
        raise ValueError(
            f"no {split} document matches include_documents={list(include)} and "
            f"exclude_documents={list(exclude)} (paths are relative to the corpus, e.g. "
            f"{counts[0][0] if counts else 'library/os.rst.txt'!r})"
        )
    return np.concatenate(pieces), kept
