"""The fault-injecting reverse proxy (tessera.testing.fault_proxy), in front of a real HTTP upstream.

The upstream is a tiny standard-library object server that records every request it received, so
"the upstream applied it" and "the upstream never saw it" are asserted exactly, not inferred."""

from __future__ import annotations

import http.client
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tessera.errors import UnsupportedLocationError
from tessera.testing.fault_proxy import (
    Delay,
    FaultProxy,
    LoseResponse,
    ResetAfter,
    ResetBefore,
    Respond,
    Rule,
    Truncate,
)


class _Store(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets connections under concurrent requests

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about connections the proxy dropped on purpose (a truncated relay resets them)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.received: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _StoreHandler)


class _StoreHandler(BaseHTTPRequestHandler):
    """PUT stores, GET (with ``Range: bytes=a-b``) and HEAD read, DELETE removes; ``/chunked``
    answers with a chunked body. Every request is recorded with its body."""

    protocol_version = "HTTP/1.1"
    server: _Store

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        with self.server.lock:
            self.server.received.append((self.command, self.path, body))
            if self.command == "PUT":
                self.server.objects[self.path] = body
                return self._send(200, b"", {"ETag": '"e"'})
            if self.command == "DELETE":
                self.server.objects.pop(self.path, None)
                return self._send(204, b"")
            data = self.server.objects.get(self.path)
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return None
        if data is None:
            return self._send(404, b"no such key")
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged[1]), int(ranged[2])
            extra = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return self._send(206, data[start : end + 1], extra)
        return self._send(200, data)

    do_GET = do_HEAD = do_PUT = do_DELETE = _any

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def store() -> Iterator[_Store]:
    server = _Store()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(store: _Store) -> Iterator[FaultProxy]:
    with FaultProxy(store.server_address, timeout=5) as running:
        yield running


def _client(proxy: FaultProxy) -> http.client.HTTPConnection:
    host, port = proxy.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=5)


def _call(
    proxy: FaultProxy, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes]:
    conn = _client(proxy)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_no_rule_passes_bytes_through_unchanged(proxy: FaultProxy, store: _Store) -> None:
    data = os.urandom(8 << 20)
    conn = _client(proxy)
    conn.request("PUT", "/b/big", body=data)
    put = conn.getresponse()
    assert (put.status, put.read(), put.getheader("ETag")) == (200, b"", '"e"')
    first_socket = conn.sock
    conn.request("GET", "/b/big")
    assert conn.getresponse().read() == data
    conn.request("GET", "/b/big", headers={"Range": "bytes=1000-1999"})
    ranged = conn.getresponse()
    assert (ranged.status, ranged.read()) == (206, data[1000:2000])
    assert ranged.getheader("Content-Range") == f"bytes 1000-1999/{len(data)}"
    conn.request("HEAD", "/b/big")
    head = conn.getresponse()
    assert (head.status, head.getheader("Content-Length"), head.read()) == (200, str(len(data)), b"")
    assert conn.sock is first_socket, "the client's connection was kept alive across requests"
    conn.close()
    assert store.objects["/b/big"] == data
    assert [(e.method, e.status, e.forwarded, e.action) for e in proxy.exchanges] == [
        ("PUT", 200, True, None),
        ("GET", 200, True, None),
        ("GET", 206, True, None),
        ("HEAD", 200, True, None),
    ]


def test_chunked_bodies_both_ways(proxy: FaultProxy, store: _Store) -> None:
    conn = _client(proxy)
    conn.request("PUT", "/b/c", body=iter([b"abc", b"defgh"]), encode_chunked=True)
    assert conn.getresponse().read() == b""
    conn.request("PUT", "/b/e", body=b"expected", headers={"Expect": "100-continue"})
    expected = conn.getresponse()
    assert (expected.status, expected.read()) == (200, b"")
    conn.request("GET", "/chunked")
    assert conn.getresponse().read() == b"hello chunked world"
    conn.close()
    assert store.received[:2] == [("PUT", "/b/c", b"abcdefgh"), ("PUT", "/b/e", b"expected")]


def test_concurrent_requests_are_counted_once_each(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(Respond(503), method="PUT", nth=5)])
    statuses: list[int] = []

    def put(i: int) -> None:
        statuses.append(_call(proxy, "PUT", f"/k{i}", b"v")[0])

    threads = [threading.Thread(target=put, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(statuses) == [200] * 15 + [503]
    assert sorted(e.index for e in proxy.exchanges) == list(range(16))
    assert len(store.objects) == 15


def test_respond_answers_without_forwarding(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(Respond(503))])
    status, _ = _call(proxy, "PUT", "/b/k", b"x")
    assert status == 503
    assert store.received == [] and store.objects == {}
    [exchange] = proxy.exchanges
    assert (exchange.status, exchange.forwarded, exchange.upstream_status) == (503, False, None)


def test_lose_response_after_the_upstream_applied_it(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(LoseResponse(412), method="PUT")])
    assert _call(proxy, "PUT", "/b/k", b"payload")[0] == 412
    assert store.objects["/b/k"] == b"payload"
    [exchange] = proxy.exchanges
    assert (exchange.status, exchange.forwarded, exchange.upstream_status) == (412, True, 200)


def test_reset_after_the_upstream_applied_it(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(ResetAfter())])
    with pytest.raises(ConnectionResetError):
        _call(proxy, "PUT", "/b/k", b"payload")
    assert store.objects["/b/k"] == b"payload"
    [exchange] = proxy.exchanges
    assert (exchange.status, exchange.forwarded, exchange.upstream_status) == (None, True, 200)


def test_reset_before_forwarding(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(ResetBefore())])
    with pytest.raises(ConnectionResetError):
        _call(proxy, "PUT", "/b/k", b"payload")
    assert store.received == []
    [exchange] = proxy.exchanges
    assert (exchange.status, exchange.forwarded) == (None, False)


def test_delay_then_forward(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules([Rule(Delay(0.3))])
    started = time.monotonic()
    assert _call(proxy, "PUT", "/b/k", b"x")[0] == 200
    assert time.monotonic() - started >= 0.3
    assert store.objects == {"/b/k": b"x"}


def test_truncated_body_is_an_incomplete_read(proxy: FaultProxy, store: _Store) -> None:
    store.objects["/b/k"] = bytes(range(256)) * 1024
    proxy.set_rules([Rule(Truncate(1000), method="GET")])
    conn = _client(proxy)
    conn.request("GET", "/b/k")
    response = conn.getresponse()
    assert response.getheader("Content-Length") == str(256 * 1024)
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    assert caught.value.partial == store.objects["/b/k"][:1000]
    conn.close()


def test_rules_match_by_index_method_path_and_nth(proxy: FaultProxy, store: _Store) -> None:
    proxy.set_rules(
        [
            Rule(Respond(500), index=0),
            Rule(Respond(503), method="PUT", path=r"/chunks/", nth=1),
            Rule(Respond(404), method="GET"),
        ]
    )
    calls = [("GET", "/a"), ("PUT", "/chunks/0"), ("PUT", "/meta"), ("PUT", "/chunks/1"), ("DELETE", "/a")]
    assert [_call(proxy, m, p, b"" if m == "PUT" else None)[0] for m, p in calls] == [500, 200, 200, 503, 204]
    assert [(e.index, e.path, e.forwarded) for e in proxy.exchanges] == [
        (0, "/a", False), (1, "/chunks/0", True), (2, "/meta", True), (3, "/chunks/1", False), (4, "/a", True)
    ]
    forwarded = [("PUT", "/chunks/0"), ("PUT", "/meta"), ("DELETE", "/a")]
    assert [(m, p) for m, p, _ in store.received] == forwarded


def test_a_fault_at_every_request_index(proxy: FaultProxy, store: _Store) -> None:
    def scenario() -> list[int]:
        return [_call(proxy, "PUT", f"/k{i}", b"v")[0] for i in range(3)]

    assert scenario() == [200, 200, 200]
    count = len(proxy.exchanges)
    for i in range(count):
        proxy.set_rules([Rule(Respond(503), index=i)])
        assert scenario() == [503 if j == i else 200 for j in range(count)]
        assert [e.index for e in proxy.exchanges] == list(range(count))


def test_upstream_down_is_a_502_and_bad_arguments_are_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{free}", timeout=5) as proxy:
        status, body = _call(proxy, "GET", "/x")
        assert status == 502 and f"127.0.0.1:{free}" in body.decode()
    with pytest.raises(UnsupportedLocationError, match="host:port"):
        FaultProxy("s3://bucket/prefix")
    with pytest.raises(re.error):
        Rule(Respond(500), path="(")


def test_stop_does_not_wait_for_idle_or_delayed_clients(store: _Store) -> None:
    outcome: list[object] = []
    with FaultProxy(store.server_address, [Rule(Delay(60), path="/slow")], timeout=30) as proxy:
        idle = _client(proxy)
        idle.request("GET", "/missing")
        assert idle.getresponse().read() == b"no such key"

        def slow() -> None:
            try:
                outcome.append(_call(proxy, "GET", "/slow"))
            except OSError as err:
                outcome.append(err)

        waiter = threading.Thread(target=slow)
        waiter.start()
        time.sleep(0.2)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    waiter.join(5)
    idle.close()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)
