"""The HTTP/1.1 connection: uvicorn's httptools protocol with the bounds it lacks.

uvicorn's fast parser (httptools) has no limit on a request's head and no deadline for it
(uvicorn 0.55, httptools 0.9): one client sending a 200 MB header grew the service by 390 MB
and held every other request for seconds (the parser builds the value by concatenation), and
a thousand connections that never finished their headers stayed open for ever, each with a
file descriptor. And a request that offers ``Upgrade: h2c`` (``curl --http2``, Java's
``HttpClient``) lost its body: the parser stops at the offer, the app read an empty body.

:class:`GuardedHttpToolsProtocol` keeps the fast parser and adds:

* the request line and headers at most :data:`MAX_HEAD_BYTES`, else 431 and the connection closed;
* the head within :data:`HEAD_TIMEOUT_S` of the connection's first byte (or of its opening),
  else 408 and closed (time *between* requests is uvicorn's keep-alive timeout);
* a client that hangs up before its answer is told to the app (``ON_GONE`` in the request's
  scope): a client that timed out and went away no longer has its images computed;
* an upgrade offer other than a WebSocket one ignored, as RFC 9110 section 7.8 allows: the
  request is parsed again without it, by this protocol, so its bounds hold for it and for the
  requests after it on the connection (handing the connection to uvicorn's h11 protocol, as
  before, lost them for the rest of its life).
"""

from __future__ import annotations

import asyncio
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Hop-by-hop headers of an upgrade offer, left out when the request is parsed again without it.
UPGRADE_HEADERS = frozenset({b"upgrade", b"http2-settings"})
# A request's scope holds a Hangup under this key: what runs when its client hangs up before the answer
# (the service drops its images from the batcher's queue; a 499). Only this protocol sets it.
ON_GONE = "vit_consumer.on_gone"
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; real clients send well under 8 KiB
HEAD_TIMEOUT_S = 10.0

log = logging.getLogger("uvicorn.error")


class Hangup:
    """One request's client leaving before its answer: callbacks registered before or after it happens run once."""

    __slots__ = ("happened", "callbacks")

    def __init__(self) -> None:
        self.happened = False
        self.callbacks: list = []

    def on(self, callback) -> None:
        if self.happened:
            callback()
        else:
            self.callbacks.append(callback)

    def fire(self) -> None:
        if not self.happened:
            self.happened = True
            for callback in self.callbacks:
                callback()


class _Refused(Exception):
    """Raised from a parser callback after the request was refused: the parser stops there."""


def _plain_response(status: str, message: str, extra: str = "") -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode() + body  # fmt: skip


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a bounded, timed request head and upgrade offers ignored (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_head = True  # from the opening, and again after each request's body
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            HEAD_TIMEOUT_S, self._head_too_slow
        )
        # (cycle, Hangup) of the requests not yet answered, pipelined ones too.
        self._hangups: list[tuple] = []
        self._refusal: bytes | None = None  # written once the requests before it are answered, then closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        for cycle, hangup in self._hangups:
            if not cycle.response_complete:
                hangup.fire()
        self._hangups = []
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # refused: nothing after it is read
            return
        if self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first bytes of the next request on a kept-alive connection
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)
        self._unset_keepalive_if_required()
        # An offer's request is parsed again without it: a loop (600 pipelined offers overflowed a recursion).
        while data:
            try:
                self.parser.feed_data(data)
                data = b""
            except httptools.HttpParserError:
                if self._refusal is None:  # not refused from a callback (on_headers_complete) already
                    self._refuse("400 Bad Request", "Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade as exc:
                if self._get_upgrade() == b"websocket" and self._should_upgrade_to_ws():
                    self.handle_websocket_upgrade()
                    return
                data = self._without_upgrade(data[exc.args[0] :])
        if self._refusal is None and self._awaiting_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse("431 Request Header Fields Too Large",
                         f"The request line and headers exceed {MAX_HEAD_BYTES} bytes")  # fmt: skip

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True  # the next request's bytes (timed from its first one, in data_received)
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        # Measured here too: a head that arrives in one read completes within it, before data_received counts.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._refuse("431 Request Header Fields Too Large",
                         f"The request line and headers exceed {MAX_HEAD_BYTES} bytes")  # fmt: skip
            raise _Refused  # stops the parser: nothing of this request reaches the app
        self._awaiting_head = False
        self._head_bytes = 0
        self._stop_head_timer()
        hangup = self.scope[ON_GONE] = Hangup()  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:  # a request (not an upgrade offer)
            self._hangups = [(c, h) for c, h in self._hangups if not c.response_complete]
            self._hangups.append((self.cycle, hangup))

    def _should_upgrade(self) -> bool:
        # Called where the parser saw an offer (``parser.should_upgrade()`` first): every offer stops the
        # parser at the body, so every one is handled in data_received: a WebSocket one as uvicorn does,
        # any other by serving the request without upgrading. (uvicorn's own test reads the last
        # Connection header only, llhttp all of them: a request with two took the body-less path.)
        return True

    def _without_upgrade(self, rest: bytes) -> bytes:
        """The offering request without its offer (its head as parsed, then the bytes after it), for a new parser;
        b"" for CONNECT (refused)."""
        if self.scope["method"] == "CONNECT":  # a tunnel, not an offer: nothing to serve without it
            self._refuse("405 Method Not Allowed", "CONNECT is not served here", "allow: GET, HEAD, POST\r\n")
            return b""
        head = [
            self.scope["method"].encode(),
            b" ",
            self.url,
            b" HTTP/",
            self.scope["http_version"].encode(),
            b"\r\n",
        ]
        for name, value in self.scope["headers"]:
            if name == b"connection":  # its other tokens stay (close, keep-alive)
                value = b", ".join(t for t in value.split(b",") if t.strip().lower() not in UPGRADE_HEADERS)
                if not value:
                    continue
            if name not in UPGRADE_HEADERS:
                head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        self.parser = httptools.HttpRequestParser(self)  # llhttp stays paused after an offer
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        data = b"".join(head) + rest
        self._awaiting_head, self._head_bytes = True, len(data)
        return data

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(
                    "408 Request Timeout", f"The request's headers did not arrive within {HEAD_TIMEOUT_S:g} s"
                )
            else:  # a connection that never sent a byte: nothing to answer
                self.transport.close()

    def _refuse(self, status: str, message: str, extra: str = "") -> None:
        """Answers ``status`` and closes, after the answers to the requests pipelined before it (a pipelining
        client reads answers in order: written at once, the refusal read as an earlier request's answer)."""
        log.warning("%s: %s (client %s)", status, message, self.client)
        self._stop_head_timer()
        self._refusal = _plain_response(status, message, extra)
        self.flow.pause_reading()
        self._refuse_when_answered()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._refuse_when_answered()

    def _refuse_when_answered(self) -> None:
        answering = (self.cycle is not None and not self.cycle.response_complete) or self.pipeline
        if self._refusal is not None and not answering and not self.transport.is_closing():
            self.transport.write(self._refusal)
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
