"""``python -m featurewatch.cli``: the same as the ``featurewatch`` command."""

from . import console

console()
