"""``python -m losswire.server`` is the ``losswire`` command line: ``python -m losswire.server losses``,
``python -m losswire.server serve --port 0``; with no command, or flags first, it serves."""

from .cli import main

main()
