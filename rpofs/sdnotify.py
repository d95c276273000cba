"""Telling systemd (Type=notify units) that a daemon is ready."""

import os
import socket


def ready(status: str = "") -> None:
    """Send READY=1 to $NOTIFY_SOCKET; nothing when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    message = "READY=1" + (f"\nSTATUS={status}" if status else "")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())
