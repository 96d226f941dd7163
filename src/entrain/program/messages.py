"""What a message of an iteration is, as both ends know it before it is sent: its key,
sender, receiver, ids and exact size. No torch: the plan's transfers are worked out from it
(program/transfers.py) by every rank, and by anything that checks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SLACK_ROWS = 4
"""Rows of headroom per tensor in a capacity (sizes the plan derives from a manifest may be
off by a rounding from what the files give)."""


@dataclass(frozen=True)
class Transfer:
    """One message of an iteration, as both ends know it before it is sent."""

    key: tuple
    """What it carries, e.g. ("act", replica, stage, microbatch); unique in the iteration."""
    src: int
    dst: int
    ids: tuple[int, ...]
    """The sample or unit ids it carries, one per tensor, in order."""
    size: int
    """Bytes on the wire, exactly (the sender pads up to it)."""
    what: str
    """Words for error messages."""


def capacity(meta: int, rows: Sequence[int], width: int, value_bytes: int = 4) -> int:
    """Bytes of a message carrying `meta` integers and one (rows[i] <= r, width) tensor per
    entry of `rows` of `value_bytes` a value, with SLACK_ROWS rows of headroom each."""
    header = 1 + 1 + meta + 1 + 3 * len(rows)
    values = sum(r + SLACK_ROWS for r in rows) * width
    return 8 * header + value_bytes * values
