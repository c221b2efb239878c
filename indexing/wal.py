"""The per-shard write-ahead log: framed, checksummed records appended under a file lock.

Frame: b"IMW1" | u32 length | u32 crc32(payload) | payload, where payload is a JSON header, a
newline and (for upserts) the float32 vector bytes. A crash mid-append leaves a torn frame that
no reader accepts; readers skip to the next valid frame, so a later acknowledged record is never
hidden behind one. The log needs a POSIX filesystem with working flock (local disk, NFSv4).
"""
from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

MAGIC = b"IMW1"
_HEAD = struct.Struct("<4sII")


@dataclass
class Record:
    """One write: op is "upsert", "delete" or "flags"."""

    op: str
    id: int
    vector: Optional[np.ndarray] = None
    uri: str = ""
    sha256: str = ""
    private: Optional[bool] = None
    unsafe: Optional[bool] = None
    phash: Optional[int] = None      # perceptual hash of an upserted image (embedding/copies.py)

    def encode(self) -> bytes:
        head = {"op": self.op, "id": int(self.id)}
        if self.op == "upsert":
            head.update(uri=self.uri, sha256=self.sha256, dim=int(len(self.vector)))
            if self.phash is not None:
                head["phash"] = int(self.phash)
        if self.op == "flags":
            head.update(private=self.private, unsafe=self.unsafe)
        payload = json.dumps(head).encode() + b"\n"
        if self.vector is not None:
            payload += np.ascontiguousarray(self.vector, dtype=np.float32).tobytes()
        return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> "Record":
        nl = payload.index(b"\n")
        head = json.loads(payload[:nl])
        vec = None
        if head["op"] == "upsert":
            vec = np.frombuffer(payload[nl + 1 :], dtype=np.float32, count=head["dim"]).copy()
        return cls(head["op"], head["id"], vec, head.get("uri", ""), head.get("sha256", ""),
                   head.get("private"), head.get("unsafe"), head.get("phash"))


@contextmanager
def locked(lock_path: str) -> Iterator[None]:
    """Exclusive inter-process lock: appends and compaction of one shard never interleave."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append(log_path: str, records: list[Record]) -> int:
    """Append records in one write and fsync before returning (the caller holds the lock).

    Returns the log size after the append."""
    data = b"".join(r.encode() for r in records)
    fd = os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_from(log_path: str, offset: int) -> tuple[list[Record], int]:
    """Valid records after byte `offset`, and the offset to resume from.

    A frame whose header or checksum is wrong is skipped by scanning for the next magic. A frame
    that runs past the end of the file may still be being written, so reading stops before it."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    out, pos = [], 0
    while pos + _HEAD.size <= len(data):
        magic, length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic == MAGIC and end <= len(data):
            payload = data[pos + _HEAD.size : end]
            if zlib.crc32(payload) == crc:
                out.append(Record.decode(payload))
                pos = end
                continue
        elif magic == MAGIC and end > len(data) and data.find(MAGIC, pos + 1) < 0:
            break  # an incomplete last frame: maybe still being written, or torn by a crash
        nxt = data.find(MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return out, offset + pos
