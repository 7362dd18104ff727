"""The bytes of one plain-HTTP exchange as the gateway writes them: the request to the origin, the response to the
client (docs/audit.md states the rule).

mitmproxy's HTTP/1 layers serve plain HTTP (`embedded.py`). Through its public surface: a message whose `stream` is a
callable hands every body chunk to it before writing the chunk (`MessageBytes` returns each chunk unchanged), and a
head is written as `http1.assemble_request_head` / `assemble_response_head` of the message. A chunked message is
written with the chunked framing around each non-empty chunk and a last `0\\r\\n\\r\\n`; that framing is counted
too, so a record's figure is what crossed the socket. Imports mitmproxy's HTTP types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.net.http import http1

_LAST_CHUNK = len(b"0\r\n\r\n")


def _chunked(message: http.Message) -> bool:
    return "chunked" in message.headers.get("transfer-encoding", "").lower()


@dataclass(slots=True)
class MessageBytes:
    """The stream callable of one message: counts its body (with chunked framing) as mitmproxy writes it."""

    chunked: bool = False
    body: int = 0
    ended: bool = False

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.body += len(chunk) + (len(b"%x\r\n\r\n" % len(chunk)) if self.chunked else 0)
        elif not self.ended:  # mitmproxy's end-of-message call
            self.ended = True
            if self.chunked:
                self.body += _LAST_CHUNK
        return chunk


@dataclass(slots=True)
class ExchangeBytes:
    """One request and its response through mitmproxy: `sent` (to the origin) and `received` (to the client)."""

    request: MessageBytes
    response: MessageBytes = field(default_factory=MessageBytes)
    request_head: int = 0  # counted when the head is known to have been written
    response_head: int = 0

    @classmethod
    def streaming(cls, request: http.Request) -> ExchangeBytes:
        """Counts for `request` (its headers final), installed as its stream callable."""
        counted = cls(MessageBytes(chunked=_chunked(request)))
        request.stream = counted.request
        return counted

    def stream_response(self, response: http.Response) -> None:
        """At `responseheaders`: the response goes through the counter. Its head is written to the client right after
        the hook (or, without a body, right after the `response` hook)."""
        self.response = MessageBytes(chunked=_chunked(response))
        self.response_head = len(http1.assemble_response_head(response))
        response.stream = self.response

    def request_written(self, request: http.Request) -> None:
        """The request head went to the origin (it is written before any response can arrive)."""
        if not self.request_head:
            self.request_head = len(http1.assemble_request_head(request))

    def response_ended(self, request: http.Request, response: http.Response) -> None:
        """At the `response` hook. mitmproxy streams every response body through our callable; a response without
        one (its end right after the head) still ends with a last chunk when it says chunked and does not answer a
        HEAD."""
        if not self.response.ended and _chunked(response) and request.method.upper() != "HEAD":
            self.response.ended = True
            self.response.body += _LAST_CHUNK

    @property
    def sent(self) -> int:
        return self.request_head + self.request.body

    @property
    def received(self) -> int:
        return self.response_head + self.response.body
