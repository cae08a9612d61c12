"""uvicorn's HTTP/1.1 protocol as the Starlette services run it: a connection that keeps a service waiting for its
request is closed after CLIENT_IDLE_SECONDS without a byte from it, and a request uvicorn cannot parse is answered
in the services' one error shape (uvicorn's own answer is text).

uvicorn keeps a connection for as long as its client does while it waits for the request line, the headers
or the body: a client that connects and sends nothing, or stops halfway, holds a descriptor and a task for
good, and enough of them take every descriptor the process has (the job server's SQLite, its job logs and
every new connection with them). uvicorn's own keep-alive timeout only covers the gap after a response.
A request's line and headers have CLIENT_IDLE_SECONDS in all from their first byte: a byte now and then is not
silence, and a client trickling them (a byte every 29 s into 16 KiB of headers) held its connection for days. The
server's own time does not count: a request being answered, however slowly, or a body the service is slow to read
(reading paused) is never cut; a body's bytes may keep coming slowly (an upload on a slow link).
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from trainmetrics.edge import error_response

CLIENT_IDLE_SECONDS = 30.0


def client_timeout_protocol(seconds: float = CLIENT_IDLE_SECONDS) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose client has been silent for `seconds` while the
    server waited for it, or whose request line and headers are not whole `seconds` after their first byte, and
    answering a request it cannot parse with a JSON 400."""

    class ClientTimeoutProtocol(H11Protocol):
        _silence: asyncio.TimerHandle | None = None
        _headers_began: float | None = None     # the loop's time of the first byte of headers not yet whole

        def send_400_response(self, msg: str) -> None:
            response = error_response(400, "bad_request", f"malformed HTTP request: {msg}")
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=response.body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._wait_for_client()

        def data_received(self, data: bytes) -> None:
            if self._headers_began is None and self.conn.their_state is h11.IDLE:
                self._headers_began = self.loop.time()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._headers_began = None
            self._wait_for_client()         # after: headers made whole by this data no longer hold a deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._silence is not None:
                self._silence.cancel()
            super().connection_lost(exc)

        def _wait_for_client(self) -> None:
            if self._silence is not None:
                self._silence.cancel()
            deadline = self.loop.time() + seconds
            if self._headers_began is not None:
                deadline = min(deadline, self._headers_began + seconds)
            self._silence = self.loop.call_at(deadline, self._silent)

        def _silent(self) -> None:
            self._silence = None
            if self.transport.is_closing():
                return
            # The client's turn: its request (IDLE) or its body (SEND_BODY) is due, and we are reading.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.flow.read_paused:
                self.transport.close()
            else:
                self._wait_for_client()

    return ClientTimeoutProtocol
