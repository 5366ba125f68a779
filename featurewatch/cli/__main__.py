"""``python -m featurewatch.cli``: the same as the ``featurewatch`` command."""

import sys

from . import main

sys.exit(main())
