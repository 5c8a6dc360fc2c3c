"""Telling systemd how the daemon is doing: the ``sd_notify`` protocol, without libsystemd.

A unit of ``Type=notify`` starts its main process with ``NOTIFY_SOCKET``: a unix
datagram socket, named by a path or, when it begins with ``@``, by an abstract address.
Each datagram is newline-separated ``KEY=value`` lines. The daemon sends

    READY=1      once a ``stat`` through the mount has been answered (``Daemon._announce``):
                 ``systemctl start`` returns, and units ordered after this one start,
                 only when the mount is live
    STATUS=...   one line for ``systemctl status`` ("serving 3 models at /home/u/Models")
    STOPPING=1   when it detaches from the mount and serves only files still open

The variable is taken out of the environment when the daemon starts, so no child
(``fusermount3``) speaks to systemd in the daemon's name. Outside systemd every call does
nothing. A failed send is logged, never raised: the mount must not die of it.

No pyfuse3 and no trio here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | None:
    """The ``connect`` address of a ``NOTIFY_SOCKET`` value, or None when it is not one
    this module speaks (systemd also knows ``vsock:``, which a local mount never gets)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends notifications to the socket named at construction; with none, does nothing."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """Take ``NOTIFY_SOCKET`` out of ``environ`` (children must not inherit it)."""
        value = environ.pop(ENV, "")
        address = socket_address(value) if value else None
        if value and address is None:
            log.warning("ignoring %s=%r: not a path or an abstract socket address", ENV, value)
        return cls(address)

    def send(self, **fields: str | int) -> bool:
        """One datagram of ``KEY=value`` lines; whether it was sent."""
        if self.address is None:
            return False
        lines = [f"{key}={' '.join(str(value).split())}" for key, value in fields.items()]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.send("\n".join(lines).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", ", ".join(fields), exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)
