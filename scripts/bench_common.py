"""What every benchmark script does with its result: print it as JSON, and write it to --out."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> None:
    """Print ``result`` as indented JSON on stdout; with ``out``, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
