"""Shared test setup.

* Every asyncio test runs twice: on the default selector loop and on uvloop (through
  pytest-asyncio's ``pytest_asyncio_loop_factories`` hook).
* Leak detection at its strictest: every BufferPool made by tests defaults to
  ``leak_detection="paranoid"`` unless a test says otherwise, and after each test pending
  leaks are reported; ``filterwarnings = error::bufpool.LeakWarning`` turns a leaked lease
  anywhere into a failure (Netty runs its suite with PARANOID detection the same way).
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

import bufpool

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
}
if sys.platform != "win32":
    import uvloop

    LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """For tests that drive a loop by hand (threads, subprocess peers): both loops."""
    return LOOP_FACTORIES[request.param]


def loop_kind(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """'uvloop' or 'asyncio' for the running (or given) loop."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


@pytest.fixture(autouse=True)
def _strict_leak_detection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original = bufpool.BufferPool.__init__

    def init(self: bufpool.BufferPool, **kwargs: Any) -> None:
        kwargs.setdefault("leak_detection", "paranoid")
        original(self, **kwargs)

    monkeypatch.setattr(bufpool.BufferPool, "__init__", init)
    yield
    gc.collect()
    bufpool.report_leaks()  # raises LeakWarning as an error under filterwarnings
