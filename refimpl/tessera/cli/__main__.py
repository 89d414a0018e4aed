"""``python -m tessera.cli``: the same as the ``tessera`` command."""

import sys

from .main import main

sys.exit(main())
