"""``python -m sandbox`` is the ``sandbox`` command."""

from .cli import main

main()
