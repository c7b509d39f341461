"""Fault injection at named points, for crash and fault tests: the one mechanism.

Code that changes state on disk marks the instants a test may want to interrupt with
``faults.point("store.create.after-driver")``. Nothing happens unless the environment variable
``GRAPHDRIVER_FAULT`` names that point::

    GRAPHDRIVER_FAULT=POINT[=ACTION][,POINT[=ACTION]...]

ACTION is ``kill`` (the default: SIGKILL this process, as a power cut or the OOM killer would),
``term`` or ``int`` (deliver SIGTERM or SIGINT to this process, as ``timeout`` or Ctrl-C would,
and go on, so the handlers run), or an errno name such as ``EIO``, ``ENOSPC`` or ``EBUSY`` (raise
that ``OSError`` here, as a failing disk or a busy mount would). Point names are dotted:
``<module>.<operation>.<instant>``; ``graphdriver faults`` is not a command, grep for
``faults.point(`` to list them.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "GRAPHDRIVER_FAULT"


def _actions() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    out: dict[str, str] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            out[name] = action or "kill"
    return out


def point(name: str) -> None:
    """Do what ``GRAPHDRIVER_FAULT`` asks at *name*; nothing when it does not name it."""
    if ENV not in os.environ:
        return
    action = _actions().get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    else:
        code = getattr(errno, action, None)
        if not isinstance(code, int):
            raise ValueError(f"{ENV}: unknown action {action!r} at {name}")
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")
