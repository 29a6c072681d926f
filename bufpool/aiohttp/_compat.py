"""Startup self-test of the aiohttp internals the zero-copy receive path relies on.

aiohttp has no public hook for a BufferedProtocol receive path, so ``_fastpath`` touches
private parts of aiohttp (written against 3.14.5).  ``check_internals`` verifies each one exists
and behaves as that code expects, on the running aiohttp, before the fast path is switched
on; any difference turns the fast path off (one log line) and the server runs aiohttp's normal
path.  Cost: one RequestHandler and two small parses, once per server.

Pinned (see ``PINNED``): on ``RequestHandler`` the message queue ``_messages`` (a deque of
``(message, payload)``), ``_waiter``, ``_request_count``, ``_max_msg_queue_size``,
``_buffer_paused``/``_reading_paused`` and ``_pause_reading_for_buffer()``, ``_close``/
``_force_close``, ``_read_bufsize``, the parser limits ``max_line_size``/``max_field_size``/
``max_headers``; ``web_protocol._ErrInfo``; ``Server.__call__`` building the handler and
``Server._loop``; ``Application._make_handler``; ``StreamReader._wait``/``_buffer``/``_eof``/
``_exception``/``_loop``/``_waiter``/``_eof_waiter``/``_eof_callbacks``;
``RequestHandler.start`` ending each request with
``payload.set_exception(_PAYLOAD_ACCESS_ERROR)`` (read from its code's names); and
``HttpRequestParser(..., response_with_body=False)`` ending a message at its head.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from aiohttp import web, web_protocol
from aiohttp.http import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_server import Server

__all__ = ["PINNED", "check_internals"]

#: (owner, attribute, kind) where kind is "method", "int", "bool", "deque", "future-or-none"
#: (instance attributes are checked on a fresh RequestHandler).
PINNED: Final = (
    ("RequestHandler", "_messages", "deque"),
    ("RequestHandler", "_waiter", "future-or-none"),
    ("RequestHandler", "_request_count", "int"),
    ("RequestHandler", "_max_msg_queue_size", "int"),
    ("RequestHandler", "_buffer_paused", "bool"),
    ("RequestHandler", "_reading_paused", "bool"),
    ("RequestHandler", "_close", "bool"),
    ("RequestHandler", "_force_close", "bool"),
    ("RequestHandler", "_read_bufsize", "int"),
    ("RequestHandler", "max_line_size", "int"),
    ("RequestHandler", "max_field_size", "int"),
    ("RequestHandler", "max_headers", "int"),
    ("RequestHandler", "_pause_reading_for_buffer", "method"),
    ("RequestHandler", "_resume_transport_reading", "method"),
    ("RequestHandler", "data_received", "method"),
    ("RequestHandler", "close", "method"),
    ("RequestHandler", "force_close", "method"),
    ("StreamReader", "_wait", "method"),
    ("StreamReader", "read_nowait", "method"),
    ("StreamReader", "wait_eof", "method"),
    ("StreamReader", "on_eof", "method"),
)

_HEADS: Final = (
    b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n",
)


def _check_attr(obj: Any, name: str, kind: str) -> str | None:
    try:
        value = getattr(obj, name)
    except AttributeError:
        return f"{type(obj).__name__}.{name} is missing"
    ok = {
        "method": callable(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "deque": isinstance(value, deque),
        "future-or-none": value is None,
    }[kind]
    return None if ok else f"{type(obj).__name__}.{name} is not a {kind} ({value!r})"


def check_internals(server: Server) -> str | None:
    """None when every pinned internal is there and behaves; else what differs."""
    if type(server) is not Server:
        return f"the server is a {type(server).__name__}, not aiohttp's Server"
    if not hasattr(server, "__dict__") or not hasattr(server, "_loop"):
        return "Server has no instance __dict__ or _loop"
    if not hasattr(web.Application, "_make_handler"):
        return "Application._make_handler is missing"
    if not isinstance(getattr(web_protocol, "_ErrInfo", None), type):
        return "web_protocol._ErrInfo is missing"
    try:
        handler = Server.__call__(server)
    except Exception as exc:  # pragma: no cover - depends on the aiohttp installed
        return f"Server() did not build a RequestHandler ({exc!r})"
    if not isinstance(handler, RequestHandler):
        return f"Server() built a {type(handler).__name__}, not a RequestHandler"
    reader = StreamReader.__new__(StreamReader)
    for owner, name, kind in PINNED:
        obj: Any = handler if owner == "RequestHandler" else reader
        problem = _check_attr(obj, name, kind)
        if problem is not None:
            return problem
    for slot in (
        "_buffer", "_eof", "_exception", "_loop", "total_bytes", "_waiter", "_eof_waiter",
        "_eof_callbacks",
    ):
        if slot not in getattr(StreamReader, "__slots__", ()):
            return f"StreamReader.{slot} is missing"
    # read_body's kept bodies are released when aiohttp ends each request with
    # ``payload.set_exception(_PAYLOAD_ACCESS_ERROR)`` in ``RequestHandler.start``.
    names = getattr(getattr(RequestHandler.start, "__code__", None), "co_names", ())
    if "set_exception" not in names or "_PAYLOAD_ACCESS_ERROR" not in names:
        return "RequestHandler.start no longer ends requests with payload.set_exception()"
    try:
        parser = HttpRequestParser(
            handler, server._loop, 2**16, max_line_size=handler.max_line_size,
            max_field_size=handler.max_field_size, max_headers=handler.max_headers,
            payload_exception=RequestPayloadError, response_with_body=False,
            auto_decompress=False,
        )
        # (fed as the receive path feeds it: a bytearray slice of its scratch buffer)
        results = [parser.feed_data(bytearray(head)) for head in _HEADS]  # type: ignore[arg-type]
    except Exception as exc:
        return f"HttpRequestParser(response_with_body=False) failed on a plain head ({exc!r})"
    for (messages, upgraded, tail), head in zip(results, _HEADS, strict=True):
        if len(messages) != 1 or upgraded or tail:
            return f"a head-only parse gave {len(messages)} messages, tail {tail!r}"
        msg, payload = messages[0]
        if payload is not EMPTY_PAYLOAD or msg.path != head.split(b" ")[1].decode():
            return "a head-only parse did not end the message at its head"
        if any(type(part) is not bytes for pair in msg.raw_headers for part in pair):
            return "a head-only parse of a bytearray kept bytearrays in raw_headers"
    return None
