"""Helpers shared by the suites that launch torchrun workers."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for torchrun's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
