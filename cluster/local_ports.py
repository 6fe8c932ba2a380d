"""A free loopback port for a server that starts later (tests, benchmarks).

Binding port 0 hands out a port from the kernel's ephemeral range, and a Ray cluster started
in the meantime takes ports from that same range for its own connections and servers: a
benchmark once lost its run because Serve's proxy could not bind the port picked a moment
before. Ports are drawn instead from the band between Ray's worker ports (10002-19999 by
default) and the kernel's ephemeral range (from 32768 by default), and checked free.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32767


def free_loopback_port(rng: random.Random | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ephemeral range."""
    rng = rng or random.SystemRandom()
    for _ in range(200):
        port = rng.randint(LOW, HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between {LOW} and {HIGH}")
