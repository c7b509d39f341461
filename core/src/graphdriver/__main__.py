"""``python -m graphdriver``: the same as the ``graphdriver`` command."""

from graphdriver.cli import main

main()
