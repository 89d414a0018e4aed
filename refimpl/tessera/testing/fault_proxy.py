"""A fault-injecting HTTP/1.1 reverse proxy (standard library only), for testing a storage that
talks to an object store over HTTP.

Why a proxy and not a :class:`~tessera.testing.faults.FaultyStorage`: the faults that matter on
an object store happen on the wire, below the client library: a 503 the client must retry, a
response lost after the server applied the request (the spec's "ambiguous answer", R9.11), a
connection reset, a truncated body. Only a real HTTP hop in front of a real server (``moto_server``
or your own) produces them the way the client library will meet them.

Use::

    with FaultProxy("127.0.0.1:9000", [Rule(ResetAfter(), method="PUT", nth=0)]) as proxy:
        storage = make_storage(endpoint=proxy.url)   # talks to the upstream through the proxy
        ...
        assert [e.forwarded for e in proxy.exchanges] == [...]

Each request is matched against the rules in order; the first rule that fires decides its
fate, and every request is recorded as an :class:`Exchange`. To inject one fault at each
request of a scenario in turn, run it once with no rule, count ``proxy.exchanges``, then for
each index ``i`` call ``proxy.set_rules([Rule(action, index=i)])`` (which starts a new trial:
log and counters cleared) and run it again.

The proxy forwards the client's ``Host`` header unchanged (request signatures stay valid),
reads chunked or ``Content-Length`` request bodies whole (in memory: test-sized objects) and
forwards them with a ``Content-Length``, streams response bodies, keeps client connections
alive, opens one upstream connection per request, and times out every socket operation, so a
test never hangs on it.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from ..errors import StorageError, UnsupportedLocationError

__all__ = [
    "Delay",
    "Exchange",
    "FaultProxy",
    "LoseResponse",
    "ResetAfter",
    "ResetBefore",
    "Respond",
    "Rule",
    "Truncate",
]

_BLOCK = 1 << 16
# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never forwarded; Expect is
# answered by the proxy's own server (100 Continue) and the body is sent whole upstream.
_HOP = frozenset(
    ["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "transfer-encoding", "upgrade", "expect"]
)


@dataclass(frozen=True)
class Respond:
    """Answer ``status`` without forwarding: the upstream never sees the request (a 503 SlowDown,
    a 500, a 412 from a rival's write; a 200 with an ``ETag`` header, as a store that ignores
    ``If-None-Match`` answers a PUT it should have refused)."""

    status: int
    body: bytes = b"injected by tessera.testing.fault_proxy\n"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoseResponse:
    """Forward the request, then answer ``status`` instead of the upstream's answer: the upstream
    applied it but the client is told otherwise (the ambiguous answer a writer must read back)."""

    status: int = 500
    body: bytes = b"response lost by tessera.testing.fault_proxy\n"


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before forwarding (a slow store; a client timeout shorter than this fires)."""

    seconds: float


@dataclass(frozen=True)
class ResetBefore:
    """Reset the client's connection (TCP RST) without forwarding: the upstream never sees it."""


@dataclass(frozen=True)
class ResetAfter:
    """Forward the request, let the upstream apply it, then reset the client's connection: the
    response is lost."""


@dataclass(frozen=True)
class Truncate:
    """Forward, send the upstream's status and headers (its ``Content-Length`` too), then only the
    first ``nbytes`` of the body and close: the client sees an incomplete read."""

    nbytes: int


Action = Respond | LoseResponse | Delay | ResetBefore | ResetAfter | Truncate


@dataclass(frozen=True)
class Rule:
    """When to apply ``action``: every condition given must hold.

    ``method``: the HTTP method (``"PUT"``); ``path``: a regular expression searched in the
    request target (path and query, as sent); ``index``: the request's 0-based index among all
    requests of the trial; ``nth``: the 0-based index among the requests this rule's ``method``
    and ``path`` match (``Rule(a, method="PUT", nth=2)``: the third PUT)."""

    action: Action
    method: str | None = None
    path: str | None = None
    index: int | None = None
    nth: int | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            re.compile(self.path)  # a bad pattern fails here, in the test, not in a server thread

    def selects(self, method: str, target: str) -> bool:
        """Whether ``method`` and ``target`` match (``index`` and ``nth`` are the proxy's to count)."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass(frozen=True)
class Exchange:
    """One request as the proxy handled it.

    ``status``: what the client was sent (``None``: the connection was reset); ``forwarded``:
    the request reached the upstream; ``upstream_status``: the upstream's answer (``None`` if
    not forwarded or it did not answer); ``action``: the fault applied (``None``: passed through)."""

    index: int
    method: str
    path: str
    status: int | None
    forwarded: bool
    upstream_status: int | None = None
    action: Action | None = None


@dataclass
class _Trial:
    """The rules of the current trial and what they counted, guarded by the proxy's lock."""

    rules: tuple[Rule, ...]
    exchanges: list[Exchange] = field(default_factory=list)
    requests: int = 0
    matched: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.matched = [0] * len(self.rules)

    def decide(self, method: str, target: str) -> tuple[int, Action | None]:
        """Give the request its index and the action of the first rule that fires (or ``None``)."""
        index, self.requests = self.requests, self.requests + 1
        chosen: Action | None = None
        for i, rule in enumerate(self.rules):
            if not rule.selects(method, target):
                continue
            nth, self.matched[i] = self.matched[i], self.matched[i] + 1
            fires = (rule.index is None or rule.index == index) and (rule.nth is None or rule.nth == nth)
            if fires and chosen is None:
                chosen = rule.action
        return index, chosen


def _parse_upstream(upstream: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(upstream, tuple):
        return upstream
    hostport = upstream.removeprefix("http://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in hostport:
        raise UnsupportedLocationError(
            f"fault proxy upstream {upstream!r}: give 'host:port' or 'http://host:port' (plain HTTP, no path)"
        )
    return host, int(port)


class FaultProxy:
    """The proxy: listens on ``127.0.0.1`` on a free port while its context is open.

    ``timeout`` bounds every socket operation, towards the client and the upstream; a client
    connection idle that long is closed. Thread-safe: requests are served concurrently, and
    :meth:`set_rules` and :attr:`exchanges` may be called from any thread."""

    def __init__(
        self, upstream: str | tuple[str, int], rules: Iterable[Rule] = (), *, timeout: float = 30.0
    ) -> None:
        self.upstream = _parse_upstream(upstream)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._trial = _Trial(tuple(rules))
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the endpoint to give the client instead of the upstream's."""
        if self._server is None:
            raise StorageError("the fault proxy is not running: use it inside its 'with' block")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def exchanges(self) -> list[Exchange]:
        """Every request of the current trial, in the order they were answered."""
        with self._lock:
            return list(self._trial.exchanges)

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Start a new trial with ``rules``: the log and every index and counter start again at 0."""
        with self._lock:
            self._trial = _Trial(tuple(rules))

    def __enter__(self) -> FaultProxy:
        if self._server is not None:
            raise StorageError(f"the fault proxy at {self.url} is already running: enter it once")
        self._stopping.clear()
        try:
            self._server = _Server(("127.0.0.1", 0), _Handler, self)
        except OSError as err:
            raise StorageError(f"the fault proxy could not listen on 127.0.0.1: {err}") from err
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, close every client connection (waking their threads) and wait for them."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(self.timeout)
        for thread in list(server.handlers):
            thread.join(self.timeout)

    # -- used by the handler threads
    def _decide(self, method: str, target: str) -> tuple[_Trial, int, Action | None]:
        """The request's trial (its exchange goes there even if :meth:`set_rules` ran meanwhile),
        index and action."""
        with self._lock:
            return (self._trial, *self._trial.decide(method, target))

    def _record(self, trial: _Trial, exchange: Exchange) -> None:
        with self._lock:
            trial.exchanges.append(exchange)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 overflows under a client's parallel PUTs, and Linux then
    # falls back to SYN cookies and may reset a connection: a fault nobody asked for.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler], proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.handlers: set[threading.Thread] = set()
        super().__init__(address, handler)

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        self.handlers.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.handlers.discard(threading.current_thread())

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went away mid-answer is the normal case under faults: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.proxy.timeout)  # no request waits forever
        # Headers and body go out in separate writes: with Nagle's algorithm on, the body waits
        # for the client's delayed ACK (about 40 ms a response), which made loads crawl.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.server.proxy._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the proxy's log is :attr:`FaultProxy.exchanges`."""

    def _serve(self) -> None:
        """Handle one request. The exchange is recorded before the client is answered, so a client
        that has its answer also finds it in :attr:`FaultProxy.exchanges`."""
        proxy = self.server.proxy
        body = self._read_body()
        trial, index, action = proxy._decide(self.command, self.path)

        def record(status: int | None, forwarded: bool, upstream: int | None = None) -> None:
            exchange = Exchange(index, self.command, self.path, status, forwarded, upstream, action)
            proxy._record(trial, exchange)

        if isinstance(action, Respond):
            record(action.status, False)
            return self._answer(action.status, action.body, action.headers)
        if isinstance(action, ResetBefore) or (
            isinstance(action, Delay) and proxy._stopping.wait(action.seconds)
        ):
            record(None, False)
            return self._reset()
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
        try:
            try:
                upstream.request(self.command, self.path, body=body, headers=self._forwarded_headers(body))
                response = upstream.getresponse()
            except (OSError, http.client.HTTPException) as err:
                host, port = proxy.upstream
                record(502, True)
                return self._answer(502, f"fault proxy: upstream {host}:{port} failed: {err!r}\n".encode())
            if isinstance(action, LoseResponse | ResetAfter):
                response.read()
                if isinstance(action, ResetAfter):
                    record(None, True, response.status)
                    return self._reset()
                record(action.status, True, response.status)
                return self._answer(action.status, action.body)
            record(response.status, True, response.status)
            return self._relay(response, action.nbytes if isinstance(action, Truncate) else None)
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _read_body(self) -> bytes | None:
        """The request body, whether sent with ``Content-Length`` or chunked (trailers dropped)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(1 << 16).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1 << 16)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _forwarded_headers(self, body: bytes | None) -> dict[str, str]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        return headers

    def _answer(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _relay(self, response: http.client.HTTPResponse, limit: int | None) -> None:
        """Send the upstream's answer; with ``limit``, only that many body bytes, then close."""
        length = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        body = None if length is not None or not has_body else response.read()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        elif length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        sent = 0
        chunks = iter((body,)) if body is not None else iter(lambda: response.read(_BLOCK), b"")
        for chunk in chunks if has_body else ():
            if limit is not None and sent + len(chunk) >= limit:
                self.wfile.write(chunk[: limit - sent])
                self.close_connection = True
                return
            self.wfile.write(chunk)
            sent += len(chunk)

    def _reset(self) -> None:
        """Close the client's connection with a TCP RST (SO_LINGER 0), not an orderly FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the file holds a reference that would keep the socket open
        self.connection.close()

