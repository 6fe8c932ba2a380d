"""Ports for servers started later stay out of the range Ray's own connections draw from."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from kvmesh.cluster.local_ports import HIGH, LOW, free_loopback_port


def test_port_is_free_and_outside_the_ephemeral_range():
    port = free_loopback_port()
    assert LOW <= port <= HIGH
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_low = int(range_file.read_text().split()[0])
    assert port < ephemeral_low
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it


def test_a_taken_port_is_skipped():
    first = random.Random(7).randint(LOW, HIGH)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", first))
        holder.listen()
        port = free_loopback_port(random.Random(7))
    assert port != first and LOW <= port <= HIGH
