"""A stand-in for logind on a test's own bus: owns org.freedesktop.login1, answers
Manager.Inhibit with a descriptor, and records every call and every descriptor the
caller closes (one JSON line each, in the file given as argv[2]).

    python tests/login1_standin.py BUS_ADDRESS LOG
"""

from __future__ import annotations

import json
import os
import sys
import threading

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection


def record(log: str, **event: object) -> None:
    with open(log, "a") as f:
        f.write(json.dumps(event) + "\n")


def watch(log: str, n: int, fd: int) -> None:
    """The caller holds the other end: EOF here means it closed its descriptor."""
    while os.read(fd, 1):
        pass
    os.close(fd)
    record(log, event="closed", inhibitor=n)


def main() -> None:
    address, log = sys.argv[1], sys.argv[2]
    conn = open_dbus_connection(bus=address, enable_fds=True)
    conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.login1"))
    record(log, event="ready")
    n = 0
    while True:
        msg = conn.receive()
        if msg.header.message_type is not MessageType.method_call:
            continue
        if msg.header.fields.get(HeaderFields.member) != "Inhibit":
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))
            continue
        n += 1
        what, who, why, mode = msg.body
        record(log, event="inhibit", inhibitor=n, what=what, who=who, why=why, mode=mode)
        r, w = os.pipe()
        threading.Thread(target=watch, args=(log, n, r), daemon=True).start()
        conn.send(new_method_return(msg, "h", (w,)))
        os.close(w)


if __name__ == "__main__":
    main()
