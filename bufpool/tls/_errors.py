"""Errors of the TLS record layer, each tied to the TLS alert a peer would send for it.

Every error raised on bad input is a :class:`TLSRecordError` and carries:

* ``alert`` -- the :class:`AlertDescription` (RFC 8446 section 6.2) that matches the fault, so a
  proxy can answer with the right fatal alert before closing;
* ``offset`` -- where the fault is, in bytes from the start of the stream fed to the splitter
  (for ClientHello errors: from the start of the handshake message);
* ``header`` -- the offending header bytes (up to 5 for a record, 4 for a handshake message).

Subclasses name the fault; messages name the limit.  Nothing here does I/O.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AlertDescription",
    "ClientHelloError",
    "NotTLSError",
    "RecordOverflowError",
    "SSLv2HelloError",
    "SplitterFailedError",
    "TLSRecordError",
    "TruncatedRecordError",
    "UnexpectedRecordError",
    "UnsupportedVersionError",
    "alert_record",
]


class AlertDescription(IntEnum):
    """TLS alert descriptions used by this package (RFC 8446 section 6.2 numbering)."""

    close_notify = 0
    unexpected_message = 10
    record_overflow = 22
    handshake_failure = 40
    illegal_parameter = 47
    decode_error = 50
    protocol_version = 70
    internal_error = 80
    unrecognized_name = 112


def alert_record(description: AlertDescription | int, *, fatal: bool = True,
                 version: int = 0x0303) -> bytes:
    """The 7 bytes of a plaintext alert record (header + level + description).

    Only meaningful before encryption starts (e.g. a proxy refusing a ClientHello).
    """
    level = 2 if fatal else 1
    return bytes((21, version >> 8, version & 0xFF, 0, 2, level, int(description)))


class TLSRecordError(ValueError):
    """Bad TLS input.  ``alert``, ``offset`` (bytes) and ``header`` (bytes) say what and where."""

    alert: AlertDescription = AlertDescription.decode_error

    def __init__(
        self,
        message: str,
        *,
        offset: int = 0,
        header: bytes = b"",
        alert: AlertDescription | None = None,
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.header = bytes(header)
        if alert is not None:
            self.alert = alert

    def __str__(self) -> str:
        base = super().__str__()
        where = f" at stream offset {self.offset}"
        hdr = f", header {self.header.hex(' ')}" if self.header else ""
        return f"{base}{where}{hdr} (alert {self.alert.name})"


class RecordOverflowError(TLSRecordError):
    """A record's length field exceeds the limit (16384 + 2048, or 16384 + 256 in TLS 1.3 mode)."""

    alert = AlertDescription.record_overflow


class UnexpectedRecordError(TLSRecordError):
    """Content type outside 20..24, a zero-length handshake/alert/change_cipher_spec record, or a
    first record that is neither handshake nor alert."""

    alert = AlertDescription.unexpected_message


class UnsupportedVersionError(TLSRecordError):
    """The record's legacy version does not have major version 3."""

    alert = AlertDescription.protocol_version


class NotTLSError(UnexpectedRecordError):
    """The stream does not start with a TLS record: plaintext where TLS was expected.

    ``looks_like`` says what it resembles, e.g. ``"an HTTP request (GET)"``.
    """

    def __init__(self, message: str, *, looks_like: str, offset: int = 0,
                 header: bytes = b"") -> None:
        super().__init__(message, offset=offset, header=header)
        self.looks_like = looks_like


class SSLv2HelloError(TLSRecordError):
    """An SSLv2-compatible ClientHello (2-byte header with the high bit set); not supported."""

    alert = AlertDescription.protocol_version


class TruncatedRecordError(TLSRecordError):
    """The stream ended inside a record (``feed_eof`` with bytes pending)."""

    alert = AlertDescription.decode_error


class ClientHelloError(TLSRecordError):
    """A malformed or truncated ClientHello; ``offset`` counts from the handshake header."""

    alert = AlertDescription.decode_error


class SplitterFailedError(TLSRecordError):
    """Input after the splitter already failed: it never resynchronises on garbage.

    ``cause`` is the first error; ``alert``/``offset``/``header`` are copied from it.
    """

    def __init__(self, cause: TLSRecordError) -> None:
        super().__init__(
            f"splitter refuses input after an earlier error: {cause}",
            offset=cause.offset,
            header=cause.header,
            alert=cause.alert,
        )
        self.cause = cause

    def __str__(self) -> str:
        return str(self.args[0])
