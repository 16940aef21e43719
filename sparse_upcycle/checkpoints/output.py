"""Writing a command's output directory so that nothing half-written is ever at ``--dst``.

``TempOutput`` checks the paths when it is made (before any work), and as a context manager
hands out a temporary sibling of ``--dst`` (``.<kind>-<name>-<pid>-XXXX``) that is renamed to
``--dst`` when the block finishes, or removed when it raises. Temporaries of earlier runs for
the same ``--dst`` whose process is gone (killed with SIGKILL, which cannot clean up) are
removed on the way in.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from sparse_upcycle.checkpoints.errors import CheckpointError


def check_output_path(src: str, dst: str, overwrite: bool) -> str:
    """Refuse a ``--dst`` that exists (without ``overwrite``), is ``--src``, lies inside it or
    contains it (replacing it would delete the source); returns ``dst`` made absolute."""
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    if dst_abs == src_abs or dst_abs.startswith(src_abs + os.sep):
        raise CheckpointError("--dst must not be --src or inside it (the source is never modified)")
    if src_abs.startswith(dst_abs + os.sep):
        raise CheckpointError("--dst must not contain --src (--overwrite would delete the source)")
    return dst_abs


def make_output_tmpdir(parent: str, prefix: str) -> str:
    """A temporary directory in ``parent`` (renamed into place when the output is complete)
    with the mode a plain ``mkdir`` would give it: ``mkdtemp``'s 0700 would hide the output
    from other users of a shared directory."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def remove_stale_partials(parent: str, name: str, kind: str) -> None:
    """Remove the temporaries of earlier ``kind`` runs for the same ``--dst`` whose process is
    gone (a run killed with SIGKILL cannot clean up after itself; its output was never renamed
    into place, so nothing of it looks complete)."""
    pattern = re.compile(rf"^\.{kind}-{re.escape(name)}-(\d+)-")
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if not m:
            continue
        try:
            os.kill(int(m[1]), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class TempOutput:
    """``--dst`` of a ``kind`` command (``upcycle``, ``export``) reading ``src``::

    output = TempOutput(src, dst, kind="upcycle", overwrite=False)  # path checks now
    ...                                                              # validate, read
    with output as tmp:                                              # write into tmp
        ...
    # tmp is now dst; had the block raised, tmp would be gone and dst untouched
    """

    def __init__(self, src: str, dst: str, *, kind: str, overwrite: bool):
        self.dst = dst
        self.dst_abs = check_output_path(src, dst, overwrite)
        self.kind = kind
        self.overwrite = overwrite
        self.tmp: str | None = None

    def __enter__(self) -> str:
        parent = os.path.dirname(self.dst_abs)
        os.makedirs(parent, exist_ok=True)
        name = os.path.basename(self.dst_abs)
        remove_stale_partials(parent, name, self.kind)
        self.tmp = make_output_tmpdir(parent, f".{self.kind}-{name}-{os.getpid()}-")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self.tmp = self.tmp, None
        assert tmp is not None, "TempOutput exited without being entered"
        try:
            if exc_type is None:
                if os.path.exists(self.dst):
                    if not self.overwrite:  # it appeared while we were writing
                        raise CheckpointError(f"{self.dst} exists; pass --overwrite to replace it")
                    shutil.rmtree(self.dst)
                os.rename(tmp, self.dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return False  # an exception of the block propagates
