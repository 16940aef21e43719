"""Checkpoint readers and writers: each format <-> a pure nested dict of arrays.

``FORMATS`` (the ``--format`` choices) lives here rather than in ``open.py`` so that the CLI can
build its parser without importing the readers (Orbax, tensorstore: seconds); ``open.py``
re-exports it.
"""

FORMATS = ("auto", "t5x", "orbax", "npz", "hf")
