"""Networking helpers shared by the actors and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on right now (the OS picks it). Another process may take it before
    the caller binds it: use only where the port must be known before the listener exists."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
