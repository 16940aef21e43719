"""Tokenise a directory of text into token shards (the format of ``token_shards.py``) with a
Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), usually the model's own.

    sparse-upcycle tokenize --src TEXT_DIR \
        --tokenizer /data/Llama-2-7b-hf/tokenizer.json --out /data/shards/my_corpus

* **Documents**: every ``*.txt`` file under ``--src`` is one document (UTF-8; undecodable
  bytes are replaced and the files counted); every line of a ``*.jsonl``, ``*.jsonl.gz`` or
  ``*.json.gz`` file (JSON lines, as C4's release) is one document, its ``--text-field``
  (``text``). Files are read in sorted order of
  their relative paths; empty documents are skipped.
* **Splits**: when ``--src`` has a ``train/`` sub-directory, each of ``train/``,
  ``validation/``, ``test/`` (those present) is a split and nothing else is read; otherwise a
  file's split comes from a hash of its relative path, as for the ``text`` corpus
  (``corpus.split_of``: 90% train, 5% validation, 5% test). Training needs a validation split.
* **Tokens**: ``encode_batch(documents, add_special_tokens=True)``, so the tokenizer's
  post-processor adds what the model was trained with (Llama's ``<s>``, T5's ``</s>``); then
  the EOS id (``--eos-token``, else the first of ``</s>``, ``<|endoftext|>``,
  ``<|end_of_text|>``, ``<eos>`` the tokenizer knows) ends every document that does not end
  with it already. Shards are ``uint16`` for vocabularies of at most 65,536 ids, else
  ``uint32``; each split is cut into shards of ``--shard-tokens`` tokens (the last shorter).
* **Sentinels**: ``<extra_id_0>``, ``<extra_id_1>``, … (T5's tokenizers) are recorded in the
  manifest when they count down from ``<extra_id_0>``, as T5's do.
* **Output**: written into a temporary sibling of ``--out`` and renamed at the end, so ``--out``
  holds a complete directory or nothing. An existing ``--out`` is refused, or with
  ``--overwrite`` replaced (only a shard directory: one holding a ``manifest.json``);
  an ``--out`` equal to or inside ``--src`` (or holding it) is refused, comparing real paths.
  The tokenizer.json is copied into the output and its sha256 recorded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 128 MiB as uint16
_BATCH_DOCS, _BATCH_CHARS = 512, 8 << 20  # documents per encode_batch call (Rust threads)
_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz")


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------


def _list_files(src: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """``(split, path)`` of every document file, sorted within each split."""
    from sparse_upcycle.data import corpus  # here: the CLI parser imports this module

    by_split = (src / "train").is_dir()
    roots = [(s, src / s) for s in corpus.SPLITS if (src / s).is_dir()] if by_split else [("", src)]
    out = []
    for split, root in roots:
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES)
        )  # sorted paths = sorted relative paths under one root
        for p in files:
            out.append((split or corpus.split_of(p.relative_to(src).as_posix()), p))
    return out


class _Reader:
    """The documents of one file, with the bytes read so far (for the progress bar)."""

    def __init__(self, path: pathlib.Path, text_field: str):
        self.path, self.text_field = path, text_field
        self.replaced = False  # a .txt file had undecodable bytes

    def documents(self, progress: tqdm) -> Iterator[str]:
        if self.path.name.endswith(".txt"):
            raw = self.path.read_bytes()
            try:
                doc = raw.decode("utf-8")
            except UnicodeDecodeError:
                doc, self.replaced = raw.decode("utf-8", errors="replace"), True
            progress.update(len(raw))
            yield doc
            return
        with open(self.path, "rb") as raw:
            lines = gzip.GzipFile(fileobj=raw) if self.path.name.endswith(".gz") else raw
            done, number = 0, 0
            try:
                for number, line in enumerate(lines, 1):
                    record = json.loads(line)
                    doc = record.get(self.text_field) if isinstance(record, dict) else None
                    if not isinstance(doc, str):
                        raise ValueError(
                            f"{self.path}:{number}: no string field {self.text_field!r} "
                            "(--text-field names it)"
                        )
                    position = raw.tell()
                    progress.update(position - done)
                    done = position
                    yield doc
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}:{number}: not a JSON line ({e})") from None
            except (OSError, EOFError) as e:  # a damaged .gz
                raise ValueError(f"{self.path}: cannot read ({e})") from None


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


class _SplitWriter:
    """One split's stream, cut into ``<split>-NNNNN.npy`` shards of ``shard_tokens`` tokens."""

    def __init__(self, out: pathlib.Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.count = 0  # pending tokens
        self.files: list[str] = []
        self.documents = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.count += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        while self.count >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> None:
        if self.count:
            self._write(self.count)

    def _write(self, n: int) -> None:
        buffer = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        name = f"{self.split}-{len(self.files):05d}.npy"
        np.save(self.out / name, buffer[:n])
        self.files.append(name)
        self.pending = [buffer[n:]] if n < len(buffer) else []
        self.count -= n


def _sentinels(tok) -> dict | None:
    first = tok.token_to_id("<extra_id_0>")
    if first is None:
        return None
    count = 1
    while count <= first and tok.token_to_id(f"<extra_id_{count}>") == first - count:
        count += 1
    return {"first": int(first), "count": count}


def _load_tokenizer(path: str):
    from tokenizers import Tokenizer  # here: the pipeline itself never needs the library

    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path} is not a file (a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the library raises plain Exception for a malformed file
        raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({e})") from None


def _check_paths(src: str, out: str, overwrite: bool) -> None:
    from sparse_upcycle.data import token_shards  # here: the CLI parser imports this module

    if not os.path.isdir(src):
        raise ValueError(f"--src {src} is not a directory")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    inside = real_out == real_src or real_out.startswith(real_src.rstrip(os.sep) + os.sep)
    if inside or real_src.startswith(real_out.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"--out {out} and --src {src} overlap ({real_out} vs {real_src}); write the shards "
            "outside the text directory"
        )
    if os.path.lexists(out):
        if not overwrite:
            raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
        if not os.path.isfile(os.path.join(out, token_shards.MANIFEST)):
            raise ValueError(
                f"--out {out} exists and is not a token shard directory (no "
                f"{token_shards.MANIFEST}); --overwrite replaces only those"
            )


def tokenize_directory(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_json: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eos_token: str | None = None,
    add_special_tokens: bool = True,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise every document under ``src_dir`` into shards at ``out_dir`` (see the module
    docstring); returns the manifest. Bad input is a ``ValueError`` naming it, raised before
    anything exists at ``out_dir``."""
    from sparse_upcycle.data import corpus, token_shards  # here: the CLI parser imports this module

    src, tok_path = os.fspath(src_dir), os.fspath(tokenizer_json)
    out = os.path.normpath(os.fspath(out_dir))
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be an int >= 1, got {shard_tokens!r}")
    _check_paths(src, out, overwrite)
    tok = _load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    eos_id = next((i for i in map(tok.token_to_id, names) if i is not None), None)
    if eos_id is None:
        raise ValueError(
            f"--tokenizer {tok_path} has no end-of-document token ({', '.join(names)}); "
            "name it with --eos-token"
        )
    files = _list_files(pathlib.Path(src))
    if not files:
        raise ValueError(f"--src {src} holds no {', '.join('*' + s for s in _SUFFIXES)} files")
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-"))
    try:
        writers = {s: _SplitWriter(tmp, s, shard_tokens, dtype) for s in corpus.SPLITS}
        replaced = 0
        batch: list[tuple[str, str]] = []
        chars = 0

        def flush() -> None:
            encodings = tok.encode_batch(
                [doc for _, doc in batch], add_special_tokens=add_special_tokens
            )
            for (split, _), encoding in zip(batch, encodings, strict=True):
                ids = np.asarray(encoding.ids, dtype)
                if not len(ids) or ids[-1] != eos_id:
                    ids = np.append(ids, np.asarray(eos_id, dtype))
                writers[split].add(ids)
            batch.clear()

        total = sum(p.stat().st_size for _, p in files)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenising", disable=not progress
        ) as bar:
            for split, path in files:
                reader = _Reader(path, text_field)
                for doc in reader.documents(bar):
                    if doc:
                        batch.append((split, doc))
                        chars += len(doc)
                    if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                        flush()
                        chars = 0
                        bar.set_postfix(tokens=sum(w.tokens for w in writers.values()))
                replaced += reader.replaced
            if batch:
                flush()
        for w in writers.values():
            w.close()
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        manifest = token_shards.write_manifest(
            tmp,
            {s: w.files for s, w in writers.items() if w.files},
            vocab_size=vocab_size,
            eos_id=eos_id,
            documents={s: w.documents for s, w in writers.items()},
            tokenizer={"file": "tokenizer.json", "sha256": token_shards.file_sha256(tok_path)},
            sentinels=_sentinels(tok),
        )
        if not manifest["splits"]:
            raise ValueError(f"--src {src}: every document is empty")
        if manifest["dtype"] != dtype.name:  # write_manifest read the files back
            raise RuntimeError(f"shards were written as {manifest['dtype']}, not {dtype.name}")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        print(
            f"warning: {replaced} file(s) had bytes that are not UTF-8 (replaced)", file=sys.stderr
        )
    return manifest


def _publish(tmp: pathlib.Path, out: str) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first and removed last."""
    aside = None
    if os.path.lexists(out):
        aside = tempfile.mkdtemp(dir=tmp.parent, prefix=f".{os.path.basename(out)}.old-")
        os.rmdir(aside)
        os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (for ``python -m`` and for a ``sparse-upcycle`` subcommand)."""
    parser.add_argument(
        "--src", required=True, help="directory of *.txt, *.jsonl[.gz], *.json.gz files"
    )
    parser.add_argument("--tokenizer", required=True, help="the model's HF tokenizer.json")
    parser.add_argument("--out", required=True, help="shard directory to create")
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file"
    )
    parser.add_argument("--eos-token", default=None, help="end-of-document token (e.g. </s>)")
    parser.add_argument(
        "--no-special-tokens",
        action="store_true",
        help="do not run the tokenizer's post-processor (no BOS/EOS it would add)",
    )
    parser.add_argument("--text-field", default="text", help="the text field of JSON lines")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing shard directory"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the command; bad input raises ``ValueError`` (one line, for the caller to print)."""
    manifest = tokenize_directory(
        args.src,
        args.out,
        args.tokenizer,
        shard_tokens=args.shard_tokens,
        eos_token=args.eos_token,
        add_special_tokens=not args.no_special_tokens,
        text_field=args.text_field,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    splits = ", ".join(
        f"{s} {e['tokens']:,} tokens / {e['documents']:,} documents / {len(e['shards'])} shards"
        for s, e in manifest["splits"].items()
    )
    print(f"wrote {args.out} ({manifest['dtype']}, vocabulary {manifest['vocab_size']}): {splits}")
    if "validation" not in manifest["splits"]:
        print("sparse-upcycle: warning: no validation split; training needs one", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    prog = "sparse-upcycle tokenize"
    parser = argparse.ArgumentParser(
        prog=prog, description="Tokenise a directory of text into token shards."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"sparse-upcycle: error: {e}", file=sys.stderr)
        return 2
