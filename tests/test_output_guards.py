# ruff: noqa: E501  (the case table below keeps one case per line)
"""Output guards: no command writes onto, into or over what it reads (paths compared resolved,
so symbolic links cannot alias them); ``--overwrite`` is a swap that a SIGKILL at any stage
leaves complete; a full disk is one line naming the output, with nothing left behind."""

import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_upcycle import cli
from sparse_upcycle.checkpoints.orbax import OrbaxCheckpoint
from sparse_upcycle.checkpoints.output import KILL_AT_ENV
from sparse_upcycle.checkpoints.t5x import write_t5x
from sparse_upcycle.checkpoints.tree import flatten
from sparse_upcycle.models import vit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir)
UPCYCLE = os.path.join(ROOT, "configs", "upcycle_tiny.py")
TRAIN = os.path.join(HERE, "configs", "train_tiny.py")
COMPARE = os.path.join(HERE, "configs", "compare_tiny.py")


def _digest(path):
    """sha256 over a file or a directory tree (names and bytes; links as their targets)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, path).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def _tree(path):
    """Every entry under ``path`` (to prove nothing was added)."""
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) for n in dirs + files]
    return sorted(out)


def _vit_npz(path, seed=0):
    model = vit.ViT(vit.config("tiny"), rngs=nnx.Rngs(seed))
    np.savez(
        path, **flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    )
    return str(path)


@pytest.fixture
def world(tmp_path):
    """A dense source directory (T5X), a .npz source file, symbolic links to them, an HF-hub-cache
    style snapshot whose files link into ../../blobs/, and a previous upcycle output."""
    w = tmp_path
    t5x = w / "data" / "checkpoint_1"
    write_t5x(str(t5x), {"a/kernel": np.ones((2, 2), np.float32)})
    (w / "link_t5x").symlink_to(t5x)
    (w / "link_data").symlink_to(w / "data")
    npz = _vit_npz(w / "data" / "vit.npz")
    (w / "link.npz").symlink_to(npz)
    entry = w / "hub" / "models--org--m"
    (entry / "blobs").mkdir(parents=True)
    (entry / "snapshots" / "rev").mkdir(parents=True)
    (entry / "blobs" / "b1").write_text("{}")
    (entry / "snapshots" / "rev" / "config.json").symlink_to(
        os.path.join("..", "..", "blobs", "b1")
    )
    hf = w / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (w / "a_file").write_text("not a directory")
    (w / "elsewhere").mkdir()
    (w / "link_elsewhere").symlink_to(w / "elsewhere")
    (w / "notes").mkdir()
    (w / "notes" / "notes.txt").write_text("a user's files, not an output")
    return w


def _refused(capsys, argv, message, world, watched):
    """Exit 2, one stderr line containing ``message``, every watched path unchanged and no new
    entry anywhere in the test's directory."""
    before = {p: _digest(p) for p in watched}
    entries = _tree(world)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("sparse-upcycle: error: ")
    assert {p: _digest(p) for p in watched} == before
    assert _tree(world) == entries  # nothing written, no temporaries
    return err


# One row per case: name, argv, expected message, sources that must stay unchanged, and the
# paths the message must name (the output and the source it would overlap).
def _cases(w):
    t5x, npz = str(w / "data" / "checkpoint_1"), str(w / "data" / "vit.npz")
    entry = w / "hub" / "models--org--m"
    snap, blobs, blob = str(entry / "snapshots" / "rev"), str(entry / "blobs"), entry / "blobs/b1"
    lt5x, ldata, lnpz = str(w / "link_t5x"), str(w / "link_data"), str(w / "link.npz")
    hfdir, a_file = str(w / "hfdir"), str(w / "a_file")
    up = ["upcycle", "--config", f"{UPCYCLE}:t5"]
    up_vit = ["upcycle", "--config", f"{UPCYCLE}:vit"]
    ex = ["export", "--format", "orbax"]
    train = ["train", "--config", f"{TRAIN}:t5"]
    cmp_ = ["compare", "--config", COMPARE]
    ow = "--overwrite"
    inside, cont = "must not be", "must not contain"
    nested = str(w / "link_data" / "checkpoint_1" / "x" / "y")
    return [
        # upcycle --dst
        ("src link, dst its target", up + ["--src", lt5x, "--dst", t5x, ow], inside, [t5x], [t5x, lt5x]),
        ("dst a link to src", up + ["--src", t5x, "--dst", lt5x, ow], inside, [t5x], [t5x, lt5x]),
        ("dst LINK/sub", up + ["--src", t5x, "--dst", lt5x + "/moe"], inside, [t5x], [t5x, lt5x]),
        ("dst LINK/sub/sub", up + ["--src", t5x, "--dst", nested], inside, [t5x], [t5x, nested]),
        ("dst a link to src's parent", up + ["--src", t5x, "--dst", ldata, ow], cont, [t5x], [t5x, ldata]),
        ("dst contains src", up + ["--src", t5x, "--dst", str(w / "data"), ow], cont, [t5x], [t5x]),
        ("npz link, dst its target", up_vit + ["--src", lnpz, "--dst", npz, ow], inside, [npz], [npz, lnpz]),
        ("dst under the npz file", up_vit + ["--src", npz, "--dst", lnpz + "/moe"], inside, [npz], [npz]),
        ("hub snapshot, dst blobs/", up + ["--src", snap, "--dst", blobs, ow], cont, [blobs], ["config.json", blobs]),
        ("hub snapshot, dst a blob", up + ["--src", snap, "--dst", str(blob), ow], inside, [blobs], ["config.json", str(blob)]),
        ("hub snapshot, dst the entry", up + ["--src", snap, "--dst", str(w / "hub"), ow], cont, [blobs], [snap]),
        ("dst a file", up + ["--src", t5x, "--dst", a_file, ow], "is a file", [t5x, a_file], [a_file]),
        ("dst a link elsewhere", up + ["--src", t5x, "--dst", str(w / "link_elsewhere"), ow], "symbolic link", [t5x], ["link_elsewhere"]),
        ("overwrite a user's directory", up + ["--src", t5x, "--dst", str(w / "notes"), ow], "is not an earlier output", [t5x, str(w / "notes")], ["notes", "notes.txt"]),
        ("overwrite an HF config dir", up + ["--src", t5x, "--dst", hfdir, ow], "is not an earlier output", [t5x, hfdir], [hfdir]),
        # export --dst
        ("export: src link, dst target", ex + ["--src", lt5x, "--dst", t5x, ow], inside, [t5x], [t5x, lt5x]),
        ("export: dst LINK/sub", ex + ["--src", t5x, "--dst", lt5x + "/out"], inside, [t5x], [t5x, lt5x]),
        ("export: dst contains src", ex + ["--src", t5x, "--dst", ldata, ow], cont, [t5x], [t5x, ldata]),
        ("export: overwrite a user's dir", ex + ["--src", t5x, "--dst", str(w / "notes"), ow], "is not an earlier output", [t5x, str(w / "notes")], ["notes"]),
        ("export: dst in --hf-source", ex + ["--src", t5x, "--hf-source", hfdir, "--dst", hfdir + "/o"], "--hf-source or inside", [hfdir], [hfdir + "/o"]),
        # train --workdir vs init_from
        ("train: workdir = init_from", train + ["--workdir", t5x, f"--config.init_from={t5x}"], inside, [t5x], [t5x, "init_from"]),
        ("train: workdir = link", train + ["--workdir", lt5x, f"--config.init_from={t5x}"], inside, [t5x], [t5x, lt5x]),
        ("train: workdir in init_from", train + ["--workdir", lt5x + "/run", f"--config.init_from={t5x}"], inside, [t5x], [t5x, lt5x]),
        ("train: workdir holds init_from", train + ["--workdir", str(w / "data"), f"--config.init_from={lt5x}"], cont, [t5x], [t5x, lt5x]),
        ("train: workdir a file", train + ["--workdir", a_file], "is a file, not a directory", [a_file], [a_file]),
        # compare --workdir vs dense_checkpoint
        ("compare: workdir = dense", cmp_ + ["--workdir", lt5x, f"--config.dense_checkpoint={t5x}"], inside, [t5x], [t5x, "dense_checkpoint"]),
        ("compare: workdir in dense", cmp_ + ["--workdir", lt5x + "/c", f"--config.dense_checkpoint={t5x}"], inside, [t5x], [t5x, lt5x]),
        ("compare: workdir a file", cmp_ + ["--workdir", a_file], "is a file, not a directory", [a_file], [a_file]),
    ]  # fmt: skip


CASE_NAMES = [c[0] for c in _cases(pathlib.Path("/w"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_an_output_never_overlaps_a_source(world, capsys, name):
    _, argv, message, watched, named = next(c for c in _cases(world) if c[0] == name)
    err = _refused(capsys, argv, message, world, watched)
    for part in named:
        assert part in err, (part, err)


def test_sources_reached_through_links_still_work(world, capsys):
    """A source given as a link, a --dst beside a linked source, an output next to (not in) the
    source: all fine."""
    npz = str(world / "data" / "vit.npz")
    before = _digest(npz)
    for src, dst in [
        (str(world / "link.npz"), str(world / "moe1")),
        (npz, str(world / "link_elsewhere" / "moe2")),
        (str(world / "link.npz"), str(world / "data" / "moe3")),  # beside the file, not in it
    ]:
        code = cli.main(["upcycle", "--config", f"{UPCYCLE}:vit", "--src", src, "--dst", dst])
        assert code == 0, capsys.readouterr().err
        assert os.path.isfile(os.path.join(dst, "recipe.json"))
    assert _digest(npz) == before


# --------------------------------------------------------------------------------------------
# --overwrite: a swap that survives SIGKILL at every stage
# --------------------------------------------------------------------------------------------


def _upcycle_proc(src, dst, *extra, kill_at=None):
    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    argv = [sys.executable, "-m", "sparse_upcycle", "upcycle", "--config", f"{UPCYCLE}:vit"]
    return subprocess.run(
        [*argv, "--src", src, "--dst", dst, *extra], env=env, capture_output=True, text=True
    )


def _source_of(out):
    """Which source a complete output came from (recipe.json + a readable checkpoint)."""
    info = json.load(open(os.path.join(out, "recipe.json")))
    ckpt = OrbaxCheckpoint(os.path.join(out, "checkpoint"))
    assert np.isfinite(ckpt.read(sorted(ckpt.keys())[0])).all()
    return info["source"]["path"]


@pytest.mark.parametrize(
    ("stage", "then"),
    [("written", "old"), ("aside", "old"), ("swapped", "new")],
)
def test_overwrite_killed_at_each_stage_leaves_a_complete_output(tmp_path, stage, then):
    old_src, new_src = _vit_npz(tmp_path / "a.npz", 0), _vit_npz(tmp_path / "b.npz", 1)
    out = tmp_path / "out"
    dst = str(out / "moe")
    assert _upcycle_proc(old_src, dst).returncode == 0
    digests = {p: _digest(p) for p in (old_src, new_src)}

    killed = _upcycle_proc(new_src, dst, "--overwrite", kill_at=stage)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(os.listdir(out))
    if stage == "aside":  # killed between the renames: the old output is complete, set aside
        (aside,) = [e for e in left if e.endswith("-old")]
        assert "moe" not in left and aside.startswith(".upcycle-moe-")
        assert _source_of(out / aside) == old_src
    else:
        assert _source_of(dst) == (old_src if then == "old" else new_src)

    # The next run (without --overwrite) puts the old output back before deciding it exists.
    again = _upcycle_proc(new_src, dst)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert _source_of(dst) == (old_src if then == "old" else new_src)
    # And a full run replaces it, cleaning up what the killed run left.
    final = _upcycle_proc(new_src, dst, "--overwrite")
    assert final.returncode == 0, final.stderr[-2000:]
    assert _source_of(dst) == new_src
    assert sorted(os.listdir(out)) == ["moe"]
    assert {p: _digest(p) for p in (old_src, new_src)} == digests


def test_a_failed_rename_in_puts_the_old_output_back(tmp_path, monkeypatch):
    from sparse_upcycle.checkpoints import output

    (tmp_path / "src").write_text("x")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "recipe.json").write_text("old")
    real_rename = os.rename

    def rename(a, b):
        if os.path.basename(a).startswith(".upcycle-dst-") and not a.endswith("-old"):
            raise OSError(errno.EIO, "Input/output error", a)
        real_rename(a, b)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        with output.TempOutput(
            str(tmp_path / "src"), str(dst), kind="upcycle", overwrite=True
        ) as t:
            (tmp_path / os.path.basename(t) / "new").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"] and os.listdir(dst) == ["recipe.json"]


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root with mount(8) allowed), else skip: the injected-failure tests
    below cover the same paths everywhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _one_line_full(proc, path):
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert "No space left on device" in err and path in err, err
    assert "absl" not in err and "Traceback" not in err


def test_a_real_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    src = _vit_npz(tmp_path / "vit.npz")
    before = _digest(src)
    dst = str(small_disk / "moe")
    proc = _upcycle_proc(src, dst)  # refused before writing: the MoE cannot fit in 64 KiB
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"--dst {dst}: the MoE checkpoint needs at least" in proc.stderr
    assert "KiB free" in proc.stderr
    assert os.listdir(small_disk) == [] and _digest(src) == before

    # export of an upcycle output (written where there is room) onto the small disk
    moe = str(tmp_path / "moe")
    assert _upcycle_proc(src, moe).returncode == 0
    moe_digest = _digest(moe)
    out = str(small_disk / "exported")
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "export", "--src", moe, "--dst", out]
        + ["--format", "orbax"],
        capture_output=True,
        text=True,
    )
    _one_line_full(proc, out)
    assert os.listdir(small_disk) == [] and _digest(moe) == moe_digest


def test_an_injected_full_disk_in_upcycle_is_one_line(tmp_path, capsys, monkeypatch):
    """The disk filling up while upcycle writes (after its room check passed)."""
    from sparse_upcycle.checkpoints import orbax as orbax_io

    src = _vit_npz(tmp_path / "vit.npz")

    def full(self, step=None):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.path, "d"))

    monkeypatch.setattr(orbax_io.StreamingWriter, "close", full)
    dst = str(tmp_path / "moe")
    code = cli.main(["upcycle", "--config", f"{UPCYCLE}:vit", "--src", src, "--dst", dst])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--dst {dst}: writing it failed: No space left on device" in err
    assert sorted(os.listdir(tmp_path)) == ["vit.npz"]


def test_an_injected_full_disk_in_export_is_one_line(tmp_path, capsys, monkeypatch):
    """Where no small disk can be mounted: the Orbax writer failing as TensorStore does."""
    from sparse_upcycle.checkpoints import orbax as orbax_io

    src = _vit_npz(tmp_path / "vit.npz")
    moe = str(tmp_path / "moe")
    assert cli.main(["upcycle", "--config", f"{UPCYCLE}:vit", "--src", src, "--dst", moe]) == 0
    capsys.readouterr()

    def full(self, step=None):
        os.makedirs(self.path, exist_ok=True)
        open(os.path.join(self.path, "partial"), "wb").write(b"x" * 100)
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "{self.path}/d/0": Failed to write 100 bytes: '
            "No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(orbax_io.StreamingWriter, "close", full)
    out = str(tmp_path / "exported")
    code = cli.main(["export", "--src", moe, "--dst", out, "--format", "orbax"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and out in err and "RESOURCE" not in err
    assert sorted(os.listdir(tmp_path)) == ["moe", "vit.npz"]


def test_a_real_full_disk_in_train_is_one_line_and_leaves_no_partial_checkpoint(small_disk):
    """A 64 KiB disk holds the metrics and TensorBoard files but not a checkpoint: the run
    stops with one error line naming --workdir (after its progress lines), no traceback or
    absl record, and no unfinished Orbax directory left to confuse a rerun."""
    workdir = str(small_disk / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_upcycle", "train", "--config", f"{TRAIN}:vit"]
        + ["--workdir", workdir, "--config.total_steps=2", "--config.checkpoint.every=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == err[-1], proc.stderr[-3000:]
    assert errors[0].startswith("sparse-upcycle: error: --workdir " + workdir)
    assert "No space left on device" in errors[0]
    assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr
    leftovers = [p for p in _tree(workdir) if "orbax-checkpoint-tmp" in p]
    assert leftovers == []


def test_an_injected_full_disk_in_train_is_one_line(tmp_path, capsys, monkeypatch):
    """Where no small disk can be mounted: Orbax's save failing as TensorStore's does, after
    leaving an unfinished step directory behind."""
    import orbax.checkpoint as ocp

    def full(self, step, *args, **kwargs):
        tmp = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp-1")
        os.makedirs(tmp, exist_ok=True)
        raise ValueError(
            f'RESOURCE_EXHAUSTED: Error writing local file "{tmp}/state/_sharding": Failed '
            "to write 48901 bytes to file 8: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    workdir = str(tmp_path / "run")
    code = cli.main(
        ["train", "--config", f"{TRAIN}:vit", "--workdir", workdir]
        + ["--config.total_steps=2", "--config.checkpoint.every=2"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"sparse-upcycle: error: --workdir {workdir}"), err
    assert "No space left on device" in err[-1] and not any("RESOURCE" in e for e in err)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == []


def test_unretrieved_write_failures_of_background_tasks_are_not_logged():
    """Orbax's other chunk writers fail too when the disk fills; asyncio logs their
    unretrieved exceptions whenever they are collected (CI once saw six such tracebacks before
    the error line). ``main`` filters exactly those; other unretrieved exceptions still show."""
    import asyncio
    import gc
    import logging

    cli.main(["inspect", "/nonexistent-path"])  # any command installs the filter
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        for exc in (
            ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device"),
            OSError(28, "No space left on device"),
            RuntimeError("a real bug"),
        ):
            loop = asyncio.new_event_loop()

            async def fail(exc=exc):
                raise exc

            task = loop.create_task(fail())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            del task
            gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert len(seen) == 1 and "exception was never retrieved" in seen[0], seen
    assert "a real bug" in seen[0]


def test_a_late_callback_into_a_closed_loop_is_dropped():
    """TensorStore wakes Orbax's loop from its own threads; after a failure that loop may be
    closed, and the late call raised 'Event loop is closed' on that thread (printed beside the
    error line). The loops the command line makes drop such a call."""
    import asyncio
    import threading

    from sparse_upcycle import async_noise

    async_noise.quiet()
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    loop.close()
    errors = []

    def late():
        try:
            loop.call_soon_threadsafe(print, "never")
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=late)
    thread.start()
    thread.join()
    assert errors == []
    plain = asyncio.SelectorEventLoop()
    plain.close()
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        plain.call_soon_threadsafe(print, "never")
