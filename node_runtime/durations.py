"""Durations as the client and the node runtime write them: ``90s``, ``45m``, ``2h30m``, ``1d`` or ``HH:MM:SS``."""

from __future__ import annotations

import argparse
import re

from node_runtime.errors import InvalidInput

_UNITS = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> int:
    """Seconds of ``90s``, ``45m``, ``2h30m``, ``1d`` or ``HH:MM:SS``; :class:`InvalidInput` names anything else."""
    stripped = text.strip()
    if ":" in stripped:
        parts = stripped.split(":")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            h, m, s = (int(p) for p in parts)
            return h * 3600 + m * 60 + s
    else:
        match = _UNITS.match(stripped)
        if stripped and match and any(match.groups()):
            d, h, m, s = (int(g or 0) for g in match.groups())
            return d * 86400 + h * 3600 + m * 60 + s
    raise InvalidInput(f"invalid duration {text!r}: expected e.g. 90s, 45m, 2h30m, 1d or HH:MM:SS")


def format_duration(seconds: float) -> str:
    """The shortest text :func:`parse_duration` reads back as ``seconds`` (whole seconds, rounded up: ``90`` ->
    ``1m30s``, ``3600`` -> ``1h``)."""
    left = max(0, -(-int(seconds * 1000) // 1000))
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            out += f"{left // size}{unit}"
            left %= size
    return out or "0s"


def positive_duration(text: str) -> int:
    """An argparse type: a duration of at least one second, or a usage error naming the value."""
    try:
        seconds = parse_duration(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be at least 1s")
    return seconds
