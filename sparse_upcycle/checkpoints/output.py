"""Writing a command's output so that nothing half-written is ever at ``--dst``, and so that no
output ever lands on (or replaces) what the command reads.

``TempOutput`` checks the paths when it is made (before any work), and as a context manager
hands out a temporary sibling of ``--dst`` (``.<kind>-<name>-<pid>-XXXX``) that is renamed to
``--dst`` when the block finishes, or removed when it raises. ``--overwrite`` is a swap: the old
output is renamed aside (``.<kind>-<name>-<pid>-old``), the new one renamed in, then the old one
removed; a process killed at any moment leaves ``--dst`` complete (old or new) or, killed between
the two renames, the complete old output under its ``-old`` name, which the next run renames
back. Temporaries and set-aside outputs of earlier runs whose process is gone (killed with
SIGKILL, which cannot clean up) are dealt with on the way in.

Path guards compare resolved paths (``os.path.realpath``) as well as the paths as written, so a
symbolic link cannot alias an output onto a source: ``refuse_overlap`` is used by ``upcycle`` and
``export`` (``--dst``), ``train`` (``--workdir`` vs ``init_from``) and ``compare``.

A full disk (ENOSPC, EDQUOT, EFBIG, from Python or from Orbax/TensorStore, whose errors carry
``os_error_code``) while writing becomes one ``CheckpointError`` naming the output, and the
absl error records Orbax's background threads log about it are held back (``held_absl_errors``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

from sparse_upcycle.checkpoints.errors import CheckpointError

# Test hook (tests/test_output_guards.py): a process whose environment names one of
# TempOutput's stages here SIGKILLs itself when it reaches it ("written": the new output is
# complete in its temporary; "aside": the old output was renamed aside; "swapped": the new
# one is in place, the old not yet removed).
KILL_AT_ENV = "SPARSE_UPCYCLE_TEST_KILL_AT"

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _stage(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Path guards
# --------------------------------------------------------------------------------------------


def _shown(path: str) -> str:
    real = os.path.realpath(path)
    return path if real == os.path.abspath(path) else f"{path} (= {real})"


def source_paths(flag: str, path: str) -> list[tuple[str, str]]:
    """``(label, path)`` for a source and for the targets of the symbolic links at its top level:
    a Hugging Face hub snapshot's files link into the cache entry's ``blobs/``, which an output
    must not replace either."""
    out = [(flag, path)]
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            entry = os.path.join(path, name)
            if os.path.islink(entry):
                out.append((f"{flag}'s {name}", entry))
    return out


def _overlap(a: str, b: str) -> str | None:
    """How path ``a`` relates to ``b``: ``is``, ``inside`` or ``contains`` (None: apart)."""
    if a == b:
        return "is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def refuse_overlap(
    flag: str,
    dst: str,
    sources: Sequence[tuple[str, str]],
    *,
    writes: str = "--overwrite would delete the source",
) -> None:
    """Raise ``CheckpointError`` when the output ``dst`` (named ``flag`` on the command line) is
    a source, lies inside one or contains one, comparing the paths as written and resolved
    (symbolic links followed); ``sources`` are ``(label, path)``. ``writes`` says why
    containing a source is refused."""
    for label, src in sources:
        for a, b in (
            (os.path.abspath(dst), os.path.abspath(src)),
            (os.path.realpath(dst), os.path.realpath(src)),
        ):
            how = _overlap(a, b)
            if how is None:
                continue
            if how == "contains":
                raise CheckpointError(
                    f"{flag} must not contain {label} ({writes}): {_shown(dst)} contains "
                    f"{_shown(src)}; choose a {flag} outside it"
                )
            where = "is" if how == "is" else "is inside"
            raise CheckpointError(
                f"{flag} must not be {label} or inside it (the source is never modified): "
                f"{_shown(dst)} {where} {_shown(src)}; choose a {flag} outside it"
            )


def check_output_path(
    src: str, dst: str, overwrite: bool, also_reads: Sequence[tuple[str, str]] = ()
) -> str:
    """Refuse a ``--dst`` that is ``--src`` (or another source in ``also_reads``), lies inside
    it or contains it (replacing it would delete the source), is a symbolic link or a file, or
    exists without ``overwrite``; returns ``dst`` made absolute."""
    sources = source_paths("--src", src)
    for label, path in also_reads:
        sources += source_paths(label, path)
    refuse_overlap("--dst", dst, sources)
    if os.path.islink(dst):
        raise CheckpointError(
            f"--dst {dst} is a symbolic link (to {os.path.realpath(dst)}); give the output "
            "directory itself"
        )
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(
            f"--dst {dst} is a file, not an output directory; remove it or choose another --dst"
        )
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    if os.path.isdir(dst):
        refuse_foreign(dst)
    return os.path.abspath(dst)


def looks_like_output(path: str) -> bool:
    """Whether directory ``path`` is what a command writes and ``--overwrite`` may replace:
    empty, our layout (``recipe.json``), or a Hugging Face model directory (``config.json``
    beside ``*.safetensors``, what ``export --format hf`` writes)."""
    names = set(os.listdir(path))
    if not names or "recipe.json" in names:
        return True
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def refuse_foreign(dst: str) -> None:
    """``--overwrite`` replaces an earlier output, never a directory of something else (a
    mistyped ``--dst`` must not delete a user's files)."""
    if not looks_like_output(dst):
        shown = ", ".join(sorted(os.listdir(dst))[:3])
        raise CheckpointError(
            f"--dst {dst} is not an earlier output (it holds {shown}…, but no recipe.json, nor "
            "config.json with *.safetensors); --overwrite only replaces an output of "
            "sparse-upcycle: remove the directory yourself or choose another --dst"
        )


def check_workdir(workdir: str, sources: Sequence[tuple[str, str]]) -> None:
    """Refuse a ``--workdir`` that is a file, or that is, lies inside or contains a checkpoint
    the run reads (``init_from``, ``dense_checkpoint``): the run writes checkpoints, metrics and
    TensorBoard files there."""
    refuse_overlap(
        "--workdir",
        workdir,
        [s for label, path in sources for s in source_paths(label, path)],
        writes="the run writes its checkpoints and metrics there",
    )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(
            f"--workdir {workdir} is a file, not a directory; remove it or choose another --workdir"
        )


# --------------------------------------------------------------------------------------------
# Full disk
# --------------------------------------------------------------------------------------------


def space_errno(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT/EFBIG when ``exc`` (or what it was raised from) says the disk is full,
    else None. TensorStore (under Orbax) raises ``ValueError("RESOURCE_EXHAUSTED: ...
    [os_error_code='28']")`` rather than an ``OSError``."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return e.errno
        m = re.search(r"os_error_code='(\d+)'", str(e))
        if m and int(m[1]) in _SPACE_ERRNOS:
            return int(m[1])
        if "No space left on device" in str(e):
            return errno.ENOSPC
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def space_error(exc: BaseException, path: str, flag: str, done: str) -> CheckpointError | None:
    """The one-line error for a full disk while writing ``path`` (None if ``exc`` is not one)."""
    code = space_errno(exc)
    if code is None:
        return None
    quiet_closed_event_loops()
    return CheckpointError(
        f"{flag} {path}: writing it failed: {os.strerror(code)} ({done}); free space there "
        f"or choose another {flag}"
    )


def quiet_closed_event_loops() -> None:
    """After a failed Orbax write, TensorStore's completion callbacks still reach the event
    loops Orbax already closed, and each one prints ``RuntimeError: Event loop is closed`` as an
    unraisable exception, around the one-line error: drop those (only those) from now on."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loops", False):
        return

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loops = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _HoldErrors(logging.Filter):
    """Holds back the absl logger's ERROR records (Orbax's background threads log the error
    they then re-raise to the caller, with a traceback, before the caller can report it)."""

    def __init__(self, only_after_space_error: bool):
        super().__init__()
        self.only_after_space_error = only_after_space_error
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if self.only_after_space_error and not self.held:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += str(record.exc_info[1])
            if space_errno(Exception(text)) is None:
                return True
        self.held.append(record)
        return False


@contextlib.contextmanager
def held_absl_errors(only_after_space_error: bool = False) -> Iterator[_HoldErrors]:
    """Hold back absl ERROR records while the block runs (all of them, or from the first that
    reports a full disk on); they are logged when the block ends, unless it ended with a
    full-disk error (which the caller reports in one line)."""
    logger = logging.getLogger("absl")
    hold = _HoldErrors(only_after_space_error)
    logger.addFilter(hold)
    try:
        yield hold
    except BaseException as e:
        logger.removeFilter(hold)
        if space_errno(e) is None:
            for record in hold.held:
                logger.handle(record)
        raise
    logger.removeFilter(hold)
    for record in hold.held:
        logger.handle(record)


def _quiet_full_disk_threads() -> None:
    """A background writer thread (tensorboardX's) dying of a full disk prints its traceback;
    the run reports the full disk in one line instead."""
    previous = threading.excepthook
    if getattr(previous, "_drops_full_disk", False):
        return

    def hook(args) -> None:
        if args.exc_value is not None and space_errno(args.exc_value) is not None:
            return
        previous(args)

    hook._drops_full_disk = True  # type: ignore[attr-defined]
    threading.excepthook = hook


ORBAX_TMP = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def workdir_writes(workdir: str) -> Iterator[None]:
    """Around a ``train`` run writing ``workdir``: a full disk becomes one ``CheckpointError``
    naming it, after removing the unfinished Orbax checkpoints (``*.orbax-checkpoint-tmp*``; the
    complete ones stay, so a rerun resumes), with Orbax's own error records held back."""
    quiet_closed_event_loops()
    _quiet_full_disk_threads()
    try:
        with held_absl_errors(only_after_space_error=True):
            yield
    except BaseException as e:
        full = space_error(
            e, workdir, "--workdir", "unfinished checkpoints removed; a rerun resumes"
        )
        if full is None:
            raise
        # The run ends here with one line: Orbax threads still finishing the failed save
        # (which may recreate a step directory) log nothing more, and what they leave within
        # the settling time is removed too.
        logging.getLogger("absl").addFilter(lambda r: r.levelno < logging.ERROR)
        _remove_unfinished(os.path.join(workdir, "checkpoints"))
        raise full from None


def _remove_unfinished(checkpoints: str, settle_s: float = 1.0) -> None:
    """Remove the ``*.orbax-checkpoint-tmp*`` entries under ``checkpoints``, passing again
    until none has reappeared for ``settle_s``."""
    import time

    quiet_until = time.monotonic() + settle_s
    while time.monotonic() < quiet_until:
        found = False
        if os.path.isdir(checkpoints):
            for entry in os.listdir(checkpoints):
                if ORBAX_TMP in entry:
                    found = True
                    _remove(os.path.join(checkpoints, entry))
        if found:
            quiet_until = time.monotonic() + settle_s
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# The temporary output
# --------------------------------------------------------------------------------------------


def make_output_tmpdir(parent: str, prefix: str) -> str:
    """A temporary directory in ``parent`` (renamed into place when the output is complete)
    with the mode a plain ``mkdir`` would give it: ``mkdtemp``'s 0700 would hide the output
    from other users of a shared directory."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _dead(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return False  # that run is still going
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def restore_set_aside(parent: str, name: str) -> None:
    """A run of any kind killed between renaming the old output aside and renaming the new one
    in left ``--dst`` missing and the complete old output as ``.<kind>-<name>-<pid>-old``:
    rename it back."""
    dst = os.path.join(parent, name)
    if os.path.lexists(dst) or not os.path.isdir(parent):
        return
    pattern = re.compile(rf"^\.\w+-{re.escape(name)}-(\d+)-old$")
    for entry in sorted(os.listdir(parent)):
        m = pattern.match(entry)
        if m and _dead(m[1]):
            os.rename(os.path.join(parent, entry), dst)
            return


def remove_stale_partials(parent: str, name: str, kind: str) -> None:
    """Remove the temporaries (and set-aside old outputs, ``--dst`` being in place) of earlier
    ``kind`` runs for the same ``--dst`` whose process is gone (a run killed with SIGKILL cannot
    clean up after itself; its output was never renamed into place, so nothing of it looks
    complete)."""
    pattern = re.compile(rf"^\.{kind}-{re.escape(name)}-(\d+)-([^-]+)$")
    in_place = os.path.lexists(os.path.join(parent, name))
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if not m or (m[2] == "old" and not in_place):
            continue
        if _dead(m[1]):
            _remove(os.path.join(parent, entry))


class TempOutput:
    """``--dst`` of a ``kind`` command (``upcycle``, ``export``) reading ``src`` (and the
    ``(flag, path)`` sources in ``also_reads``)::

    output = TempOutput(src, dst, kind="upcycle", overwrite=False)  # path checks now
    ...                                                              # validate, read
    with output as tmp:                                              # write into tmp
        ...
    # tmp is now dst; had the block raised, tmp would be gone and dst untouched
    """

    def __init__(
        self,
        src: str,
        dst: str,
        *,
        kind: str,
        overwrite: bool,
        also_reads: Sequence[tuple[str, str]] = (),
    ):
        self.dst = dst
        dst_abs = os.path.abspath(dst)
        self.parent, self.name = os.path.dirname(dst_abs), os.path.basename(dst_abs)
        restore_set_aside(self.parent, self.name)  # before "exists" is decided
        self.dst_abs = check_output_path(src, dst, overwrite, also_reads)
        self.kind = kind
        self.overwrite = overwrite
        self.tmp: str | None = None
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> str:
        os.makedirs(self.parent, exist_ok=True)
        remove_stale_partials(self.parent, self.name, self.kind)
        self.tmp = make_output_tmpdir(self.parent, f".{self.kind}-{self.name}-{os.getpid()}-")
        self._held = contextlib.ExitStack()
        self._held.enter_context(held_absl_errors())
        quiet_closed_event_loops()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self.tmp = self.tmp, None
        held, self._held = self._held, None
        assert tmp is not None and held is not None, "TempOutput exited without being entered"
        try:
            with held:  # absl errors about a full disk are dropped, others logged now
                if exc is not None:
                    raise exc
                _stage("written")
                self._swap_in(tmp)
        except BaseException as e:
            _remove(tmp)
            full = space_error(e, self.dst, "--dst", "the partial output was removed")
            if full is not None:
                raise full from None
            if e is exc:
                return False  # the block's exception propagates unchanged
            raise
        return False

    def _swap_in(self, tmp: str) -> None:
        dst = self.dst_abs
        if not os.path.lexists(dst):
            os.rename(tmp, dst)
            return
        if not self.overwrite:  # it appeared while we were writing
            raise CheckpointError(f"{self.dst} exists; pass --overwrite to replace it")
        aside = os.path.join(self.parent, f".{self.kind}-{self.name}-{os.getpid()}-old")
        _remove(aside)
        os.rename(dst, aside)
        _stage("aside")
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(aside, dst)
            raise
        _stage("swapped")
        _remove(aside)
