"""``python -m sparse_upcycle`` is the ``sparse-upcycle`` command."""

import sys

from sparse_upcycle.cli import main

sys.exit(main())
