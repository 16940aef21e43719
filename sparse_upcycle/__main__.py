"""``python -m sparse_upcycle`` is the ``sparse-upcycle`` command."""

from sparse_upcycle.cli import entry

entry()
