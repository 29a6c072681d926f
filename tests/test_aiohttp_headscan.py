"""The zero-copy receive path's head scan (bufpool/aiohttp/_headscan.py and its compiled twin
bufpool/aiohttp/_chead.c): the documented answers for each shape of read, and the two twins
giving the same answer (or the same error) on generated reads."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bufpool.aiohttp import _headscan

Scan = Callable[[object, int], int]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _compiled() -> ModuleType | None:
    """The compiled twin, imported directly (also under BUFPOOL_NO_EXTENSIONS, which only
    decides which twin the receive path uses)."""
    try:
        return importlib.import_module("bufpool.aiohttp._chead")
    except ImportError:
        if _flag("BUFPOOL_REQUIRE_EXTENSIONS"):
            raise
        return None


CHEAD = _compiled()
TWINS: list[tuple[str, Scan]] = [("python", _headscan.scan_head_py)]
if CHEAD is not None:
    TWINS.append(("c", CHEAD.scan_head))


def test_the_scanner_chosen_follows_the_environment() -> None:
    if _flag("BUFPOOL_NO_EXTENSIONS"):
        assert _headscan.SCANNER == "python"
        assert _headscan.scan_head is _headscan.scan_head_py
    elif _flag("BUFPOOL_REQUIRE_EXTENSIONS"):
        assert _headscan.SCANNER == "c"
        assert CHEAD is not None and _headscan.scan_head is CHEAD.scan_head
    assert _headscan.SCANNER in ("c", "python")


HEAD = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
END = len(HEAD)

# (read, nbytes or None for all of it, expected)
CASES: list[tuple[str, bytes, int | None, int]] = [
    ("whole request", HEAD + b"hello", None, END),
    ("head only", HEAD, None, END),
    ("head and part of its body", HEAD + b"hel", None, END),
    ("nbytes stops inside the body", HEAD + b"hello", END + 2, END),
    ("a second request follows the body", HEAD + b"helloGET / HTTP/1.1\r\n\r\n", None, -1),
    ("head not ended yet", HEAD[:-2], None, -1),
    ("nbytes stops inside the head", HEAD + b"hello", END - 1, -1),
    ("nothing", b"", None, -1),
    ("bare LF in the head", b"POST / HTTP/1.1\nHost: a\r\nContent-Length: 1\r\n\r\nx", None, -1),
    ("LF-only head", b"GET / HTTP/1.1\n\n", None, -1),
    ("bare LF after the head is body", HEAD + b"a\nb\nc", None, END),
    ("name in lower case", HEAD.replace(b"Content-Length", b"content-length") + b"hello",
     None, END),
    ("name in upper case, spaces and tabs around the value",
     HEAD.replace(b"Content-Length: 5", b"CONTENT-LENGTH:\t 5 \t") + b"hello", None,
     END + 3),
    ("bytes follow but no Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\n\r\nabc", None, -1),
    ("a longer name is not Content-Length",
     b"POST / HTTP/1.1\r\nContent-Length-X: 9\r\n\r\nabc", None, -1),
    ("signed value", HEAD.replace(b": 5", b": +5") + b"hello", None, -1),
    ("empty value", HEAD.replace(b": 5", b":") + b"hello", None, -1),
    ("value with a space inside", HEAD.replace(b": 5", b": 1 2") + b"hello", None, -1),
    ("value that is not a number", HEAD.replace(b": 5", b": five") + b"hello", None, -1),
    ("18 digits", HEAD.replace(b": 5", b": " + b"9" * 18) + b"hello", None, END + 17),
    ("19 digits", HEAD.replace(b": 5", b": " + b"9" * 19) + b"hello", None, -1),
    ("the first Content-Length line decides",
     HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 999\r\n\r\n") + b"helloxyz", None, -1),
    ("leading empty line", b"\r\n" + HEAD + b"hello", None, END + 2),
    ("two leading empty lines end an empty head", b"\r\n\r\n" + HEAD, None, -1),
]


@pytest.mark.parametrize("name,scan", TWINS, ids=[t[0] for t in TWINS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scan_head_answers(
    name: str, scan: Scan, case: tuple[str, bytes, int | None, int]
) -> None:
    _, read, nbytes, expected = case
    n = len(read) if nbytes is None else nbytes
    for buf in (bytearray(read), read, memoryview(bytearray(read + b"tail"))):
        assert scan(buf, n) == expected, (buf, n)


@pytest.mark.parametrize("name,scan", TWINS, ids=[t[0] for t in TWINS])
@pytest.mark.parametrize("nbytes", [-1, len(HEAD) + 1])
def test_scan_head_refuses_nbytes_outside_the_buffer(name: str, scan: Scan, nbytes: int) -> None:
    with pytest.raises(ValueError, match=rf"nbytes must be within 0\.\.{len(HEAD)}, got {nbytes}"):
        scan(bytearray(HEAD), nbytes)


_ATOMS = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"Content-Length:", b"content-length:",
    b"CONTENT-LENGTH: ", b"Content-Length-X:", b" ", b"\t", b"0", b"5", b"17", b"+3",
    b"9" * 18, b"9" * 19, b"POST / HTTP/1.1", b"Host: a", b"x", b"\x00", b"\xff",
]


@pytest.mark.skipif(CHEAD is None, reason="the compiled twin is not built here")
@settings(max_examples=3000, deadline=None)
@given(
    parts=st.lists(st.sampled_from(_ATOMS), max_size=14),
    cut=st.floats(min_value=0.0, max_value=1.0),
    kind=st.sampled_from(["bytearray", "bytes", "memoryview"]),
)
def test_the_twins_agree(parts: list[bytes], cut: float, kind: str) -> None:
    assert CHEAD is not None
    read = b"".join(parts)
    nbytes = int(len(read) * cut)
    buf: object = {
        "bytearray": bytearray(read), "bytes": read, "memoryview": memoryview(read),
    }[kind]
    assert CHEAD.scan_head(buf, nbytes) == _headscan.scan_head_py(buf, nbytes)
    assert CHEAD.scan_head(buf, len(read)) == _headscan.scan_head_py(buf, len(read))
