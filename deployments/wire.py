"""The search path between an Ingress replica and the shard replicas: one TCP connection per pair,
any number of searches in flight on it, each a length-prefixed frame. Plain asyncio, no Ray.

Why not a Serve handle call: on this 2-core machine one costs about 4 ms of routing, gRPC and
bookkeeping across three processes (docs/benchmarks.md, issue 31), ten times the search it carries,
and a lone query paid it on every shard. Serve still places, restarts and health-checks the shard
replicas, carries every write and tells the Ingress where each replica listens (`Shard.endpoint`);
only search bytes take this path, and a search whose connection fails goes through the handle.

Frames: 12-byte header (payload length, request id) + payload, in a fixed binary layout, never a
pickle: the port is open to the cluster's network, and a frame from anyone else must not run code.
Request: n, d, k, nprobe (-1: the index's default) and the (n, d) float32 matrix. Answer: a status
byte; "ok" carries n, k, the (n, k) float32 scores and int64 ids and the hits' metadata as JSON
([id, uri, sha256 prefix, perceptual hash] per id); "overloaded" (past the replica's limit) and
"error" carry a message."""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import time
from typing import Awaitable, Callable, Optional

import numpy as np
import orjson

LOG = logging.getLogger("ray.serve")
HEADER = struct.Struct("<IQ")
# A frame past this is a broken peer, not a search (256 queries x 2,000 candidates with metadata
# stay far below it).
MAX_FRAME = 512 * 1024 * 1024
# Discovery runs at most this often when no replica is reachable directly.
MIN_REFRESH_S = 0.5


class ShardOverloaded(Exception):
    """The shard replica is at its limit of searches in flight: a 503 for the client, no retry."""


class ShardError(Exception):
    """The shard replica's search raised; its message says why."""


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, rid = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes")
    return rid, await reader.readexactly(size)


def _frame(rid: int, *parts: bytes) -> bytes:
    return HEADER.pack(sum(map(len, parts)), rid) + b"".join(parts)


REQUEST = struct.Struct("<IIIi")  # n, d, k, nprobe
ANSWER = struct.Struct("<II")  # n, k
OK, OVERLOADED, ERROR = b"o", b"b", b"e"


def encode_request(queries: np.ndarray, k: int, nprobe: Optional[int]) -> list[bytes]:
    q = np.ascontiguousarray(queries, dtype="<f4")
    return [REQUEST.pack(q.shape[0], q.shape[1], k, -1 if nprobe is None else nprobe), q.tobytes()]


def decode_request(payload: bytes) -> tuple[np.ndarray, int, Optional[int]]:
    """(queries, k, nprobe); ValueError for a frame that is no search."""
    if len(payload) < REQUEST.size:
        raise ValueError("short request")
    n, d, k, nprobe = REQUEST.unpack_from(payload)
    if len(payload) != REQUEST.size + 4 * n * d or not n or not d or k < 1:
        raise ValueError(f"malformed request ({n} x {d}, k {k}, {len(payload)} bytes)")
    queries = np.frombuffer(payload, "<f4", n * d, REQUEST.size).reshape(n, d)
    return queries, k, None if nprobe < 0 else nprobe


def encode_answer(out: dict) -> list[bytes]:
    D, I = np.ascontiguousarray(out["D"], "<f4"), np.ascontiguousarray(out["I"], "<i8")
    meta = orjson.dumps([[i, *m] for i, m in out["meta"].items()])
    return [OK, ANSWER.pack(*I.shape), D.tobytes(), I.tobytes(), meta]


def decode_answer(payload: bytes) -> dict:
    """{"D", "I", "meta"}; ShardOverloaded or ShardError for a refusal."""
    status, body = payload[:1], payload[1:]
    if status == OVERLOADED:
        raise ShardOverloaded(body.decode())
    if status != OK:
        raise ShardError(body.decode(errors="replace"))
    n, k = ANSWER.unpack_from(body)
    at = ANSWER.size + 4 * n * k
    D = np.frombuffer(body, "<f4", n * k, ANSWER.size).reshape(n, k)
    I = np.frombuffer(body, "<i8", n * k, at).reshape(n, k)
    meta = {m[0]: tuple(m[1:]) for m in orjson.loads(body[at + 8 * n * k:])}
    return {"D": D, "I": I, "meta": meta}


class ShardServer:
    """Answers searches on a port with `search(queries, k, nprobe) -> dict`, run in a worker
    thread (FAISS releases the GIL) unless it is one query and the only search in flight: then on
    the loop, since a thread handoff costs more than that search (~0.2 ms). At most `limit`
    searches in flight over all connections, the bound a Serve replica puts on its handle calls
    (ongoing + queued). A frame that is no search is answered with an error."""

    def __init__(self, search: Callable[[np.ndarray, int, Optional[int]], dict], limit: int,
                 on_search: Callable[[float], None] = lambda seconds: None):
        self.search, self.limit, self.on_search = search, limit, on_search
        self.in_flight = 0
        self.server: Optional[asyncio.base_events.Server] = None

    async def start(self, host: str) -> tuple[str, int]:
        """Listen on an ephemeral port of `host` (the node's address); returns (host, port)."""
        self.server = await asyncio.start_server(self._connection, host, 0)
        return host, self.server.sockets[0].getsockname()[1]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                rid, payload = await _read_frame(reader)
                task = asyncio.create_task(self._answer(rid, payload, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the Ingress went away: its searches are nobody's now
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, rid: int, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if self.in_flight >= self.limit:
            answer = [OVERLOADED, f"shard replica at its limit of {self.limit} searches in flight".encode()]
        else:
            self.in_flight += 1
            try:
                queries, k, nprobe = decode_request(payload)
                t0 = time.perf_counter()
                if len(queries) == 1 and self.in_flight == 1:  # alone: a thread handoff costs more than it
                    out = self.search(queries, k, nprobe)
                else:  # FAISS releases the GIL: other searches and the loop go on meanwhile
                    out = await asyncio.to_thread(self.search, queries, k, nprobe)
                self.on_search(time.perf_counter() - t0)
                answer = encode_answer(out)
            except Exception as e:  # the caller gets the reason; the connection stays up
                LOG.exception("search failed")
                answer = [ERROR, f"{type(e).__name__}: {e}".encode()]
            finally:
                self.in_flight -= 1
        if not writer.is_closing():
            writer.write(_frame(rid, *answer))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class ShardConnection:
    """One connection to one shard replica, shared by every search of an Ingress replica."""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count()
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.closed = False

    async def open(self, timeout_s: float) -> "ShardConnection":
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(*self.address), timeout_s)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A replica whose node vanished sends no FIN: keepalive notices within about 10 s, and
        # the searches waiting on it end by their deadline meanwhile.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 4), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self._reading = asyncio.create_task(self._read())  # held: the loop keeps only weak task references
        return self

    async def _read(self) -> None:
        try:
            while True:
                rid, payload = await _read_frame(self.reader)
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():  # a search that timed out has no one waiting
                    fut.set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._fail(ConnectionError(f"shard replica at {self.address[0]}:{self.address[1]} went away ({e!r})"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()
        if self.writer is not None:
            self.writer.close()

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int]) -> dict:
        """The replica's answer; ConnectionError when the replica is gone."""
        if self.closed:
            raise ConnectionError(f"connection to {self.address} closed")
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            self.writer.write(_frame(rid, *encode_request(queries, k, nprobe)))
            payload = await fut
        finally:
            self.pending.pop(rid, None)
        try:
            return decode_answer(payload)
        except (ValueError, struct.error, orjson.JSONDecodeError) as e:  # the peer is no shard replica
            error = ConnectionError(f"bad answer from {self.address[0]}:{self.address[1]}: {e!r}")
            self._fail(error)
            raise error from None

    def close(self) -> None:
        self._fail(ConnectionError("closed"))


class ShardLink:
    """The searches of one shard deployment from one Ingress replica: over direct connections to
    its replicas (the least busy one each time), through `fallback` (the Serve handle) while none
    is known or when one fails. `discover()` asks Serve for one replica's address (a handle
    call, routed to any replica); a few calls find each replica, and they are made again every
    `refresh_s` and after a failure, so replicas that start or move are found."""

    def __init__(self, discover: Callable[[], Awaitable[tuple[str, int]]],
                 fallback: Callable[[np.ndarray, int, Optional[int]], Awaitable[dict]],
                 refresh_s: float = 10.0, probes: int = 4, connect_timeout_s: float = 2.0):
        self.discover, self.fallback = discover, fallback
        self.refresh_s, self.probes, self.connect_timeout_s = refresh_s, probes, connect_timeout_s
        self.connections: dict[tuple[str, int], ShardConnection] = {}
        self._refreshed = -float("inf")
        self._refreshing: Optional[asyncio.Task] = None

    async def search(self, queries: np.ndarray, k: int, nprobe: Optional[int]) -> dict:
        """One replica's answer to the matrix of queries."""
        conn = self._pick()
        self._maybe_refresh(now=conn is None)
        if conn is None:
            return await self.fallback(queries, k, nprobe)
        try:
            return await conn.search(queries, k, nprobe)
        except ConnectionError as e:
            LOG.warning("%s; searching through Serve", e)
            self.connections.pop(conn.address, None)
            self._maybe_refresh(now=True)
            return await self.fallback(queries, k, nprobe)

    def _pick(self) -> Optional[ShardConnection]:
        live = [c for c in self.connections.values() if not c.closed]
        return min(live, key=lambda c: len(c.pending)) if live else None

    def _maybe_refresh(self, now: bool = False) -> None:
        # `now` (none live, or one just failed): soon, but not once per search when no replica
        # can be reached directly, which would multiply handle calls.
        due = time.monotonic() - self._refreshed > (min(self.refresh_s, MIN_REFRESH_S) if now else self.refresh_s)
        if due and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            found = await asyncio.gather(*[self.discover() for _ in range(self.probes)], return_exceptions=True)
            for address in {tuple(a) for a in found if not isinstance(a, BaseException)}:
                if address not in self.connections or self.connections[address].closed:
                    try:
                        self.connections[address] = await ShardConnection(address).open(self.connect_timeout_s)
                    except (OSError, asyncio.TimeoutError) as e:
                        LOG.warning("shard replica at %s:%s not reachable (%r); searching through Serve",
                                    *address, e)
            for address in [a for a, c in self.connections.items() if c.closed]:
                del self.connections[address]
        finally:
            self._refreshed = time.monotonic()
            self._refreshing = None

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()
