"""The JSON-type checks of a Hugging Face ``config.json`` that every family's HF map
(``hf_llama``, ``hf_t5``, ``hf_vit``) runs before reading it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def check_hf_types(
    hf: Any,
    *,
    ints: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    strs: tuple[str, ...] = (),
    dicts: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> None:
    """Refuse, naming the field, a ``config.json`` value of the wrong JSON type (a string or a
    float where a positive int belongs, a list where an object belongs); an absent field or
    ``null`` is left to the reader's default. Shared by the HF maps of every family."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")

    def bad(name: str, expected: str):
        value = hf[name]
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return ValueError(
            f"config.json: {name} must be {expected}, got {shown} ({type(value).__name__})"
        )

    for name in required:  # absent: the reader names it; null: no value where one must be
        if name in hf and hf[name] is None:
            raise ValueError(f"config.json: {name} must be set, got null")
    present = [n for n in (*ints, *floats, *bools, *strs, *dicts) if hf.get(n) is not None]
    for name in present:
        value = hf[name]
        if name in ints and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise bad(name, "a positive integer")
        if name in floats and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value)
        ):
            raise bad(name, "a finite number")
        if name in bools and not isinstance(value, bool):
            raise bad(name, "true or false")
        if name in strs and not isinstance(value, str):
            raise bad(name, "a string")
        if name in dicts and not isinstance(value, Mapping):
            raise bad(name, "a JSON object (or null)")
