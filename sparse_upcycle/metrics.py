"""Where a training run's metrics go: a JSONL file, TensorBoard event files, and the console.

* ``MetricWriter(workdir)`` writes every record to ``<workdir>/metrics.jsonl`` (one JSON
  object per line: ``step``, ``split`` and the scalar metrics) and to TensorBoard event files
  under ``<workdir>/tensorboard/`` (tensorboardX; no TensorFlow needed). Only process 0 of a
  multi-host job writes anything. A resumed run calls ``truncate_after(restored_step)`` first,
  so the JSONL file ends up as an uninterrupted run would have written it and TensorBoard hides
  the events of the lost steps.
* ``Progress(total_steps, start_step, every=...)``: a tqdm bar on a terminal, plain log lines
  (``step 120/1000 loss 2.345 lr 1.0e-03 3.2 steps/s eta 4m31s``) otherwise.
* ``split_scalars(metrics)``: jax/numpy values to Python floats, non-scalars set aside.

Expert load. The models report, per MoE layer, the fraction of kept token assignments each
expert handled (``routing.RouterMetrics.expert_load``, sums to 1). A metric named
``expert_load`` (or ``expert_load/<layer>``) may be a dict ``{layer_name: [E]}``, a ``[E]``
vector or a stacked ``[num_moe_layers, E]`` array (``moe_config.average_metrics``; rows are
named ``0``, ``1``, …). Each layer's vector becomes

* a TensorBoard histogram over expert ids (bucket ``e`` holds expert e's load), tag
  ``<split>/expert_load/<layer>``, and
* two scalars, ``expert_load/<layer>/max_ratio`` and ``…/min_ratio``: the largest and smallest
  load divided by the mean load 1/E (1.0 = perfectly balanced; the "max load / mean load"
  imbalance measure of Lepikhin et al. 2021, GShard, and Fedus et al. 2021, Switch), which go
  to TensorBoard and to the JSONL file.

Other non-scalar metrics become plain value histograms in TensorBoard and stay out of the
JSONL file. Non-finite numbers are written to JSONL as the strings ``"NaN"``, ``"Infinity"``
and ``"-Infinity"`` (strict JSON has no literal for them; ``float()`` reads them back).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SPLITS = ("train", "eval")
EXPERT_LOAD = "expert_load"


# --------------------------------------------------------------------------------------------
# Values.
# --------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def split_scalars(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, arrays): numbers and one-element arrays (jax or numpy) as Python floats, every
    other array as a numpy array. Nested dicts are flattened with "/" (``{"a": {"b": x}}`` →
    ``"a/b"``). Fetching a jax array waits for the computation that produces it."""
    scalars: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, value in _flatten(metrics).items():
        if isinstance(value, jax.Array):
            value = jax.device_get(value)
        arr = np.asarray(value)
        if arr.size == 1 and arr.dtype.kind in "biuf":
            scalars[name] = float(arr.reshape(()))
        elif arr.dtype.kind in "biuf":
            arrays[name] = arr
        else:
            raise TypeError(f"metric {name!r} is not numeric: {value!r}")
    return scalars, arrays


def expert_load_layers(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """``{"<name>/<layer>": load [E]}`` from a ``[E]`` vector or a ``[layers, E]`` stack."""
    if value.ndim == 1:
        return {name: value}
    if value.ndim == 2:
        return {f"{name}/{i}": row for i, row in enumerate(value)}
    raise ValueError(f"{name}: expected a [E] or [layers, E] expert load, got {value.shape}")


def load_ratios(load_E: np.ndarray) -> tuple[float, float]:
    """(max, min) of ``load_e / mean(load)``; (nan, nan) when nothing was routed."""
    load = np.asarray(load_E, np.float64)
    mean = load.mean()
    if not mean > 0:
        return math.nan, math.nan
    return float(load.max() / mean), float(load.min() / mean)


def _json_number(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


# --------------------------------------------------------------------------------------------
# The writer.
# --------------------------------------------------------------------------------------------


class MetricWriter:
    """JSONL + TensorBoard sink of a run's metrics (see the module docstring).

    Args:
      workdir: the run directory; ``metrics.jsonl`` and ``tensorboard/`` are created in it.
      process_index: this process's index in a multi-host job (default
        ``jax.process_index()``); every process but 0 writes nothing.
      flush_secs: how often tensorboardX flushes its event queue in the background.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, process_index: int | None = None, flush_secs: int = 30
    ):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, JSONL_NAME)
        self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
        if process_index is None:
            process_index = jax.process_index()
        self.active = process_index == 0
        self._file: IO[str] | None = None
        self._tb: SummaryWriter | None = None
        if self.active:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            os.makedirs(self.tensorboard_dir, exist_ok=True)
            # tensorboardX names event files by the second; a run resumed within the same
            # second would truncate the previous file, so a nanosecond suffix keeps each
            # session's file (and sorts them in time order, as TensorBoard reads them).
            self._tb = SummaryWriter(
                self.tensorboard_dir, flush_secs=flush_secs, filename_suffix=f".{time.time_ns()}"
            )

    # -- writing -------------------------------------------------------------------------

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Record ``metrics`` (scalars, expert loads, other arrays) at ``step`` for ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not self.active:
            return
        step = int(step)
        scalars, arrays = split_scalars(metrics)
        histograms: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            if name.split("/")[0] != EXPERT_LOAD:
                histograms[name] = value
                continue
            for layer, load in expert_load_layers(name, value).items():
                self._expert_histogram(f"{split}/{layer}", load, step)
                scalars[f"{layer}/max_ratio"], scalars[f"{layer}/min_ratio"] = load_ratios(load)
        record = {"step": step, "split": split}
        record.update({k: _json_number(v) for k, v in scalars.items()})
        if self._file is None:
            os.makedirs(self.workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a line per record reaches the OS even if the run dies
        tb = self._tensorboard()
        for name, value in scalars.items():
            tb.add_scalar(f"{split}/{name}", value, step)
        for name, value in histograms.items():
            tb.add_histogram(f"{split}/{name}", value.reshape(-1), step)

    def _expert_histogram(self, tag: str, load_E: np.ndarray, step: int) -> None:
        """Histogram over expert ids weighted by load: bucket e spans (e-1/2, e+1/2]."""
        load = np.asarray(load_E, np.float64).reshape(-1)
        ids = np.arange(load.size, dtype=np.float64)
        self._tensorboard().add_histogram_raw(
            tag,
            min=0.0,
            max=float(load.size - 1),
            num=float(load.sum()),
            sum=float(ids @ load),
            sum_squares=float((ids * ids) @ load),
            bucket_limits=(ids + 0.5).tolist(),
            bucket_counts=load.tolist(),
            global_step=step,
        )

    # -- resuming ------------------------------------------------------------------------

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records with a step > ``step`` (and a half-written last line), and tell
        TensorBoard to hide events after ``step`` (a ``SessionLog.START`` event at ``step + 1``,
        TensorBoard's purge marker). Call it once, right after restoring a checkpoint."""
        if not self.active:
            return
        step = int(step)
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if int(record["step"]) <= step:
                        kept.append(json.dumps(record) + "\n")
            # Write-then-rename: a crash here leaves the old file or the new one, never half.
            fd, tmp = tempfile.mkstemp(dir=self.workdir, prefix=".metrics.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        # Type-checker ignores: the protobuf module defines its classes at import time, and
        # tensorboardX declares file_writer None until its constructor has set it.
        from tensorboardX.proto.event_pb2 import Event, SessionLog  # pyright: ignore[reportAttributeAccessIssue]

        purge = SessionLog(status=SessionLog.START)
        self._tensorboard().file_writer.add_event(  # pyright: ignore[reportOptionalMemberAccess]
            Event(step=step + 1, wall_time=time.time(), session_log=purge)
        )

    def _tensorboard(self) -> SummaryWriter:
        """The TensorBoard writer (there is one exactly while ``active``)."""
        if self._tb is None:
            raise RuntimeError("this MetricWriter is inactive (not process 0, or closed)")
        return self._tb

    # -- lifetime ------------------------------------------------------------------------

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.active = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Console progress.
# --------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``45s``, ``4m31s``, ``2h05m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_value(name: str, value: float) -> str:
    if name in ("lr", "learning_rate"):
        return f"{value:.1e}"
    return f"{value:.4g}"


class Progress:
    """Training progress on the console.

    On a terminal (``tty``, default ``sys.stderr.isatty()``): a tqdm bar from ``start_step``
    to ``total_steps`` with rate and ETA, its postfix showing the latest scalars. Otherwise
    (logs, CI): one line every ``every`` steps and at the last step, e.g.
    ``step 120/1000 loss 2.345 lr 1.0e-03 3.2 steps/s eta 4m31s``, the rate measured since
    the previous line. Metrics are fetched from the device only when shown, so calling
    ``update`` every step does not synchronise every step.

    Args:
      total_steps: the step the run ends at.
      start_step: the step it starts (or resumes) from.
      every: log interval in steps (plain mode; the tqdm postfix refreshes at the same rate).
      tty: force bar (True) or plain lines (False).
      stream: where to write (default ``sys.stderr``).
      clock: seconds, monotonic (``time.monotonic``; replaceable in tests).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        every: int = 100,
        tty: bool | None = None,
        stream: IO[str] | None = None,
        clock=time.monotonic,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.total_steps, self.every = int(total_steps), int(every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._last_step, self._last_time = int(start_step), clock()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=int(start_step),
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
            )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
        """Report that ``step`` is done; returns the plain line when one is written."""
        step = int(step)
        show = step % self.every == 0 or step >= self.total_steps
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if show and metrics:
                scalars, _ = split_scalars(metrics)
                self._bar.set_postfix(
                    {k: _format_value(k, v) for k, v in scalars.items()}, refresh=False
                )
            return None
        if not show:
            return None
        now = self.clock()
        elapsed = now - self._last_time
        rate = (step - self._last_step) / elapsed if elapsed > 0 else math.nan
        eta = (self.total_steps - step) / rate if rate > 0 else math.nan
        self._last_step, self._last_time = step, now
        parts = [f"step {step}/{self.total_steps}"]
        if metrics:
            scalars, _ = split_scalars(metrics)
            parts += [f"{k} {_format_value(k, v)}" for k, v in scalars.items()]
        rate_text = "?" if not math.isfinite(rate) else f"{rate:.3g}"
        parts += [f"{rate_text} steps/s", f"eta {format_duration(eta)}"]
        line = " ".join(parts)
        print(line, file=self.stream, flush=True)
        return line

    def write(self, message: str) -> None:
        """A message that does not break the bar (``tqdm.write`` on a terminal)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
