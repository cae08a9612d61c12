"""The Starlette services cut a client that keeps them waiting for its request, and only such a client."""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.processes import wait_answering

# A service behind trainmetrics.edge.serve with a 0.5 s client timeout: /slow answers after 1.5 s (the
# server's own time, never cut), /upload counts the body it reads.
SERVICE = """
import asyncio, socket
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from trainmetrics.edge import serve
from trainmetrics.webconfig import WebConfig

async def slow(request):
    await asyncio.sleep(1.5)
    return PlainTextResponse("slow")

async def upload(request):
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
    except ClientDisconnect:        # the half body the test leaves, once it is cut
        return PlainTextResponse("cut", status_code=400)
    return PlainTextResponse(str(size))

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
print(sock.getsockname()[1], flush=True)
serve(Starlette(routes=[Route("/slow", slow), Route("/upload", upload, methods=["POST"])]), sock, WebConfig(),
      client_idle_seconds=0.5)
"""


@pytest.fixture
def service():
    process = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        wait_answering(f"{url}/nothing", process, 20, "the service", interval=0.05)
        yield port, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:      # a connection uvicorn waits on at shutdown
            process.kill()
            process.wait()
        process.stdout.close()


def closed_within(connection: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (None: still open after `seconds`)."""
    began = time.monotonic()
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - began


def test_a_client_that_keeps_the_server_waiting_is_cut(service):
    """Before: each of these stayed open as long as its client wanted (75 s and counting, on the job server)."""
    port, _ = service
    silent = socket.create_connection(("127.0.0.1", port))
    half_headers = socket.create_connection(("127.0.0.1", port))
    half_headers.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    half_body = socket.create_connection(("127.0.0.1", port))
    half_body.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\na,label\n")
    for connection in (silent, half_headers, half_body):
        assert closed_within(connection, 5) is not None
        connection.close()


def test_a_slow_answer_and_a_slow_steady_body_are_not_cut(service):
    _, url = service
    assert httpx.get(f"{url}/slow", timeout=10).text == "slow"          # 1.5 s of the server's own time

    def body():
        for _ in range(6):                                             # 1.8 s in all, a chunk every 0.3 s
            time.sleep(0.3)
            yield b"x" * 100

    assert httpx.post(f"{url}/upload", content=body(), timeout=10).text == "600"


@pytest.mark.parametrize("request_bytes", [b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                                           b"\x16\x03\x01\x00\xa5\x01\r\n\r\n", b"GET /a b HTTP/1.1\r\n\r\n"],
                         ids=["a header without a colon", "a TLS hello to the plain port", "a space in the path"])
def test_a_request_uvicorn_cannot_parse_is_a_json_400(service, request_bytes):
    """uvicorn answered it itself, in text ("Invalid HTTP request received."), where every other error of the
    services is the JSON error shape."""
    port, _ = service
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request_bytes)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower(), answer
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("malformed HTTP request"), error


def test_a_client_trickling_its_headers_is_cut(service):
    """A byte now and then is not silence: a client sending its headers a byte every 0.2 s (at the defaults, one
    every 29 s into 16 KiB of headers) held its connection for as long as it liked."""
    port, url = service
    began, cut = time.monotonic(), None
    with socket.create_connection(("127.0.0.1", port)) as trickler:
        for byte in b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - began
                break
            if closed_within(trickler, 0.2) is not None:
                cut = time.monotonic() - began
                break
    assert cut is not None and cut < 3, cut
    assert httpx.get(f"{url}/slow", timeout=10).text == "slow"      # a request whole at once is answered
