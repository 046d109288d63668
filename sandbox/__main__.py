"""``python -m sandbox`` is the ``sandbox`` command."""

from ._entry import main

main()
