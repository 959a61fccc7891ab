"""``python -m losswire.server`` is ``losswire serve``."""

from .cli import main

main()
