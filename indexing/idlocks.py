"""One writer per image id across every Ingress replica and node.

Under cell placement an upsert may move an id between shards: it reads which shards hold the id,
then writes to two of them. Two such writes of one id (or a flag change between the read and the
move) must not interleave, wherever they run, or the id ends up on two shards or loses a flag.
The writers meet at a lock file of the id's slot in the index directory, on the filesystem the
write-ahead logs already require (POSIX flock: local disk, NFSv4)."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from typing import AsyncIterator

SLOTS = 4096  # ids share a lock file by slot: few files, rare waits between different ids


def lock_path(index_dir: str, id_: int) -> str:
    """The lock file of an id's slot."""
    return os.path.join(index_dir, "live", "ids", f"{id_ % SLOTS:04d}.lock")


@contextlib.asynccontextmanager
async def id_lock(index_dir: str, id_: int, max_wait_s: float = 0.05) -> AsyncIterator[None]:
    """Hold the id's slot lock (exclusive between processes and between open files of one process).
    Waits by polling with a growing pause, so no thread blocks in flock and a cancelled writer
    leaves nothing locked; the lock goes with the file descriptor, so a writer that dies frees it."""
    path = lock_path(index_dir, id_)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(pause)
                pause = min(2 * pause, max_wait_s)
        yield
    finally:
        os.close(fd)  # releases the lock
