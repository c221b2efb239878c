"""The direct search path between the Ingress and shard replicas (deployments/wire.py), over real
TCP sockets on this machine, without Ray: answers match, the replica's limit refuses, a search
that raises says why, and a replica that goes away sends searches to the fallback (the Serve
handle in the service) until discovery finds a live one."""
import asyncio
import threading

import numpy as np
import pytest

from deployments.wire import ShardConnection, ShardError, ShardLink, ShardOverloaded, ShardServer


def fake_search(queries: np.ndarray, k: int, nprobe):
    """Row i's ids are i*100 .. i*100+k-1 plus the first component: each query's own answer."""
    base = (queries[:, :1] * 1000).astype(np.int64)
    I = base + np.arange(k)[None, :]
    return {"D": np.ones((len(queries), k), np.float32), "I": I, "meta": {int(i): ("u", "s", nprobe or 0) for i in I[:, 0]}}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_searches_on_one_connection_get_their_own_answers():
    async def main():
        server = ShardServer(fake_search, limit=100)
        address = await server.start("127.0.0.1")
        conn = await ShardConnection(address).open(2)
        qs = [np.full((2, 4), i, np.float32) for i in range(40)]
        answers = await asyncio.gather(*[conn.search(q, 3, 7) for q in qs])
        conn.close()
        server.close()
        return answers

    for i, a in enumerate(run(main())):
        assert a["I"].tolist() == [[i * 1000, i * 1000 + 1, i * 1000 + 2]] * 2
        assert a["meta"][i * 1000] == ("u", "s", 7)


def test_past_its_limit_a_replica_refuses_and_a_failing_search_says_why():
    release = threading.Event()

    def slow(queries, k, nprobe):
        if nprobe == 13:
            raise ValueError("nprobe 13 is unlucky")
        release.wait(10)
        return fake_search(queries, k, nprobe)

    async def main():
        server = ShardServer(slow, limit=2)
        conn = await ShardConnection(await server.start("127.0.0.1")).open(2)
        q = np.zeros((2, 4), np.float32)  # two rows: searched in a worker thread, not on the loop
        held = [asyncio.ensure_future(conn.search(q, 1, None)) for _ in range(2)]
        await asyncio.sleep(0.3)
        with pytest.raises(ShardOverloaded):
            await conn.search(q, 1, None)
        release.set()
        assert [len(a["I"]) for a in await asyncio.gather(*held)] == [2, 2]
        with pytest.raises(ShardError, match="ValueError: nprobe 13 is unlucky"):
            await conn.search(q, 1, 13)
        assert (await conn.search(q, 1, None))["I"].shape == (2, 1)  # the connection stays up
        server.close()

    run(main())


def test_a_replica_that_goes_away_sends_searches_to_the_fallback_until_another_is_found():
    async def main():
        first = ShardServer(fake_search, limit=10)
        addresses = [await first.start("127.0.0.1")]
        fallback_calls = []

        async def discover():
            return addresses[-1]

        async def fallback(q, k, nprobe):
            fallback_calls.append(len(q))
            return fake_search(q, k, nprobe)

        link = ShardLink(discover, fallback, refresh_s=0.2)
        q = np.ones((1, 4), np.float32)
        await link.search(q, 2, None)  # nothing known yet: through the fallback, discovery starts
        await asyncio.sleep(0.2)
        assert (await link.search(q, 2, None))["I"].tolist() == [[1000, 1001]]
        assert fallback_calls == [1] and len(link.connections) == 1

        first.server.close()  # the replica dies: its connections drop
        for conn in link.connections.values():
            conn.writer.transport.abort()
        await asyncio.sleep(0.3)  # past the least pause between two lookups
        assert all(conn.closed for conn in link.connections.values())
        second = ShardServer(fake_search, limit=10)
        addresses.append(await second.start("127.0.0.1"))
        assert (await link.search(q, 2, None))["I"].tolist() == [[1000, 1001]]  # answered: by the fallback
        assert fallback_calls == [1, 1]
        await asyncio.sleep(0.3)
        await link.search(q, 2, None)
        assert fallback_calls == [1, 1]  # the new replica answered
        assert list(link.connections) == [addresses[-1]]
        link.close()
        second.close()

    run(main())


def test_a_connection_that_breaks_mid_search_fails_it_with_connection_error():
    async def main():
        gate = asyncio.Event()

        async def handler(reader, writer):  # reads a request and hangs up without answering
            await reader.read(10)
            gate.set()
            writer.transport.abort()

        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        conn = await ShardConnection(srv.sockets[0].getsockname()[:2]).open(2)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.search(np.zeros((1, 4), np.float32), 1, None), 5)
        assert gate.is_set() and conn.closed
        srv.close()

    run(main())


def test_frames_are_plain_binary_and_a_stranger_s_frame_is_refused():
    from deployments.wire import decode_answer, decode_request, encode_answer, encode_request

    q = np.arange(8, dtype=np.float32).reshape(2, 4)
    got, k, nprobe = decode_request(b"".join(encode_request(q, 5, None)))
    assert got.tolist() == q.tolist() and (k, nprobe) == (5, None)
    answer = decode_answer(b"".join(encode_answer(fake_search(q, 3, 9))))
    assert answer["I"].tolist() == [[0, 1, 2], [4000, 4001, 4002]] and answer["meta"][4000] == ("u", "s", 9)
    for junk in (b"", b"\x80\x04\x95" + b"\x00" * 20, b"".join(encode_request(q, 5, 1))[:-4]):
        with pytest.raises(ValueError):
            decode_request(junk)
