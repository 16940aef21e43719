"""Quiet what Orbax and TensorStore leave behind a failed read or write, so that a failing
command prints its one error line and nothing else.

* Orbax writes a checkpoint's chunks as asyncio tasks; when the disk fills, one of them raises
  into the save (which the command reports) and the others' exceptions stay unretrieved, so
  asyncio logs each, with its traceback, whenever the garbage collector reaches it.
  ``_ReportedWriteFailures`` drops exactly those records (a failed write: ENOSPC,
  RESOURCE_EXHAUSTED), and those of a failed read of corrupt data (TensorStore's DATA_LOSS:
  a restore reads a tree's leaves as sibling tasks, one raises into the restore, which the
  command reports as one line; seen on a loaded machine with a truncated OCDBT manifest);
  any other unretrieved exception is still logged.
* TensorStore completes its futures on threads of its own and wakes the waiting asyncio loop
  with ``loop.call_soon_threadsafe``; after a failure Orbax's loop may already be closed, and
  the late call raised ``RuntimeError: Event loop is closed`` on that thread, printed as a
  traceback beside the error line. The loops made here (``_Loop``, through the event-loop
  policy) drop a call that comes after they closed: nothing is waiting for it any more.
"""

from __future__ import annotations

import asyncio
import logging


class _ReportedWriteFailures:
    """A filter for the ``asyncio`` logger: drops "Task/Future exception was never retrieved"
    records whose exception is a failed write (a full disk, TensorStore's RESOURCE_EXHAUSTED)
    or a read of corrupt data (DATA_LOSS), which the command has reported.
    Orbax writes a checkpoint's chunks as background tasks; when the disk fills, one of them
    raises into the save (which ``main`` reports as one line) and the others' exceptions are
    left unretrieved, so asyncio logs each one, with its traceback, whenever the garbage
    collector reaches it, which may be before the error line. Any other unretrieved
    exception is still logged."""

    MARKS = ("No space left on device", "RESOURCE_EXHAUSTED", "os_error_code='28'", "DATA_LOSS")

    def filter(self, record) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not any(m in text or m in str(exc or "") for m in self.MARKS)


class _Loop(asyncio.SelectorEventLoop):
    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():  # a late TensorStore callback: no one waits on this loop
            return None
        return super().call_soon_threadsafe(callback, *args, context=context)


class _Policy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _Loop()


def quiet() -> None:
    """Install the filter and the loop policy (once; a policy of someone else's is kept)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ReportedWriteFailures) for f in log.filters):
        log.addFilter(_ReportedWriteFailures())
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_Policy())
