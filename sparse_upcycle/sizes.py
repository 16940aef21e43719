"""Sizes in bytes: ``--hbm``-style strings parsed and byte counts printed (``plan``, the
upcycle room check), and the collectives of a compiled HLO module counted with their result
bytes (``plan``)."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``32GiB``, ``80GB``, ``512MiB``, ``16e9``, ``1.5TB`` -> bytes (GB = 10^9, GiB = 2^30).

    Raises:
      ValueError: not a positive finite number followed by an optional unit.
    """
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(f"expected a size such as 32GiB, 80GB or 16e9, got {text!r}")
    try:
        value = float(match.group(1)) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 32GiB, 80GB or 16e9, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a size of at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes in binary units (``3.07 GiB``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# HLO element types -> bytes (sub-byte integers round up: they are rare and tiny here).
_HLO_BYTES = {"pred": 1, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_HLO_BYTES.update({f"{s}{n}": max(n // 8, 1) for s in "su" for n in (2, 4, 8, 16, 32, 64)})
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<phase>-start|-done)?\("
)


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = _HLO_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue  # a token or an opaque type: no data
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count", "bytes"}}`` of the collectives in an HLO module's text, the bytes
    those of each op's result (per device, in a partitioned module). An asynchronous pair
    (``all-gather-start`` / ``-done``) is counted once, at its ``-done`` (whose result is the
    output; ``-start``'s holds the operands too)."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if m is None or m.group("phase") == "-start":
            continue
        out[m.group("op")]["count"] += 1
        out[m.group("op")]["bytes"] += _shape_bytes(m.group("shape"))
    return out
