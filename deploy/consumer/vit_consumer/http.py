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
  connection is handed to uvicorn's h11 protocol with the request, which serves it as
  plain HTTP/1.1 (h11 has its own 16 KiB head limit).
"""

from __future__ import annotations

import asyncio
import logging

import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


def _plain_response(status: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body  # fmt: skip


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
        self._h11_pending: bytes | None = None  # an upgrade offer behind requests still being answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        for cycle, hangup in self._hangups:
            if not cycle.response_complete:
                hangup.fire()
        self._hangups = []
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._h11_pending is not None:  # bytes for the h11 protocol, which takes over once answers are out
            self._h11_pending += data
            return
        if self._awaiting_head:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first bytes of the next request on a kept-alive connection
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade as exc:
            if self._get_upgrade() == b"websocket" and self._should_upgrade_to_ws():
                self.handle_websocket_upgrade()
            elif self._answering():  # hand over after the answers before it: they must go out first, in order
                self._h11_pending = data[exc.args[0] :]
                self.flow.pause_reading()
            else:
                self._serve_with_h11(data[exc.args[0] :])
            return
        if self._awaiting_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse("431 Request Header Fields Too Large",
                         f"The request line and headers exceed {MAX_HEAD_BYTES} bytes")  # fmt: skip

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True  # the next request's bytes (timed from its first one, in data_received)
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
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

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._h11_pending is not None and not self._answering() and not self.transport.is_closing():
            rest, self._h11_pending = self._h11_pending, None
            self._serve_with_h11(rest)

    def _answering(self) -> bool:
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _serve_with_h11(self, rest: bytes) -> None:
        """Replays the request (its head as parsed, then the bytes after it) into an h11 protocol."""
        self._stop_head_timer()
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        head = [
            self.scope["method"].encode(),
            b" ",
            self.url,
            b" HTTP/",
            self.scope["http_version"].encode(),
            b"\r\n",
        ]
        for name, value in self.scope["headers"]:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        protocol = H11Protocol(config=self.config, server_state=self.server_state, app_state=self.app_state,
                               _loop=self.loop)  # fmt: skip
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(b"".join(head) + rest)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(
                    "408 Request Timeout", f"The request's headers did not arrive within {HEAD_TIMEOUT_S:g} s"
                )
            else:  # a connection that never sent a byte: nothing to answer
                self.transport.close()

    def _refuse(self, status: str, message: str) -> None:
        log.warning("%s: %s (client %s)", status, message, self.client)
        self._stop_head_timer()
        self.transport.write(_plain_response(status, message))
        self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
