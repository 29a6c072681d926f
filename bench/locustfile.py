"""Locust scenario with the harness's default mix, for load from more than one machine.

Same requests as ``python -m bufpool loadtest``: ``POST /process?reply=R`` with bodies drawn
from a weighted size mix (default 1 KiB, 16 KiB, 256 KiB in equal thirds) and 4 KiB replies,
against the example app (``examples/aiohttp_app.py``).  Tune with environment variables,
in the harness's syntax:

    BUFPOOL_MIX="1k:1,16k:1,256k:1"   request body sizes and weights
    BUFPOOL_REPLY=4096                reply size in bytes
    BUFPOOL_WAIT=0                    seconds each user waits between requests (0: closed loop)

Distributed (one master, any number of workers, on any machines that reach the server):

    locust -f bench/locustfile.py --master --headless -u 64 -r 64 -t 60s \\
        --host http://SERVER:8080 --expect-workers 2
    locust -f bench/locustfile.py --worker --master-host MASTER      # on each load machine

Locust reports throughput and percentiles itself; it does not correct for coordinated
omission and does not sample the server, so use the harness for those on one machine.
Locust is an optional extra (``pip install locust``); nothing else in bufpool needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import ClassVar

from locust import FastHttpUser, constant

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if m is None:
        raise ValueError(f"bad size {text!r} in BUFPOOL_MIX")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _mix(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size, _, weight = part.partition(":")
        out.append((_size(size), int(weight or 1)))
    return out


MIX = _mix(os.environ.get("BUFPOOL_MIX", "1k:1,16k:1,256k:1"))
REPLY = int(os.environ.get("BUFPOOL_REPLY", "4096"))
PATTERN = bytes(range(33, 127)) * (max(size for size, _ in MIX) // 94 + 1)
BODIES = [(PATTERN[:size], weight) for size, weight in MIX]


def _make_task(body: bytes) -> Callable[[FastHttpUser], None]:
    def send(user: FastHttpUser) -> None:
        user.client.post(
            f"/process?reply={REPLY}",
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            name=f"/process body={len(body)}",
        )

    return send


class PoolUser(FastHttpUser):
    """One keep-alive connection sending the mix."""

    wait_time = constant(float(os.environ.get("BUFPOOL_WAIT", "0")))
    tasks: ClassVar[dict[Callable[[FastHttpUser], None], int]] = {
        _make_task(body): weight for body, weight in BODIES
    }
