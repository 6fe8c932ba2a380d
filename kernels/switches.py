"""On/off switches read from the environment (``KVMESH_CPU_PACKED_LINEAR``,
``KVMESH_CPU_DOT_LINEAR``, ``KVMESH_CPU_MALLOC_TUNING``): one spelling of on and off for
all of them, and a clear error for anything else rather than a silent default."""

from __future__ import annotations

import os

_ON = ("1", "true", "yes", "on", "")
_OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool = True) -> bool:
    """The switch ``name``: ``default`` when unset; 1/true/yes/on or 0/false/no/off (any case)
    when set; anything else raises ValueError naming the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")
