"""``python -m graphdriver``: the same as the ``graphdriver`` command (always run here)."""

import signal

if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the script does: no traceback at start

from graphdriver.cli import main

main()
