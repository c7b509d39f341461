"""errors.py is the one error boundary: every error a user sees is one line."""

from __future__ import annotations

import errno

from graphdriver import DriverError, LayerNotFound
from graphdriver.errors import from_oserror


def test_a_message_of_several_lines_becomes_one() -> None:
    exc = LayerNotFound("no layer x\n  second line\n\n")
    assert str(exc) == "no layer x; second line"


def test_an_os_error_with_a_commands_stderr_becomes_one_line() -> None:
    stderr = "device-mapper: reload ioctl failed: No such device or address\nCommand failed.\n"
    err = from_oserror(OSError(errno.ENXIO, stderr), "activate thin device 7")
    assert isinstance(err, DriverError) and err.errno == errno.ENXIO
    assert str(err) == (
        "activate thin device 7: device-mapper: reload ioctl failed: No such device or "
        "address; Command failed."
    )
