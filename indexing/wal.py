"""The per-shard write-ahead log: framed, checksummed records appended under a file lock.

Frame: b"IMW2" | u32 length | u32 crc32(payload) | u32 crc32(the 12 bytes before) | payload, where
payload is a JSON header, a newline and (for upserts) the float32 vector bytes. The header has its
own checksum, so a reader trusts a frame's length only when the header is intact, and it never
looks past a frame that runs beyond the end of the file: that frame may still be being appended by
another replica, and its visible bytes (a uri, a vector) may contain the marker. A crash
mid-append leaves such a torn tail; the next writer cuts it off under the lock before appending,
so a later record never sits behind garbage. Frames of the first format (b"IMW1", no header
checksum) are still read. The log needs a POSIX filesystem with working flock (local disk, NFSv4).
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

from indexing import storage

MAGIC = b"IMW2"
_HEAD = struct.Struct("<4sIII")
LEGACY_MAGIC = b"IMW1"  # first format: no header checksum
_LEGACY_HEAD = struct.Struct("<4sII")


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
            # An upsert that moves an id to another shard carries its flags there.
            head.update({k: v for k, v in (("private", self.private), ("unsafe", self.unsafe)) if v is not None})
        if self.op == "flags":
            head.update(private=self.private, unsafe=self.unsafe)
        payload = json.dumps(head).encode() + b"\n"
        if self.vector is not None:
            payload += np.ascontiguousarray(self.vector, dtype=np.float32).tobytes()
        # The current header is the first format's 12 bytes followed by their own checksum.
        prefix = _LEGACY_HEAD.pack(MAGIC, len(payload), zlib.crc32(payload))
        return prefix + struct.pack("<I", zlib.crc32(prefix)) + payload

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


def append(log_path: str, records: list[Record], good_end: Optional[int] = None) -> int:
    """Append records in one write and fsync before returning (the caller holds the lock).

    First cuts a torn tail (a frame a crash left half written) back to `good_end`, the end of the
    last complete frame (found by reading the log when not given). Returns the log size after."""
    data = b"".join(r.encode() for r in records)
    created = not os.path.exists(log_path)
    fd = os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if good_end is None and size:
            good_end = read_from(log_path, 0)[1]
        if good_end is not None and size > good_end:
            os.ftruncate(fd, good_end)
            size = good_end
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            # Not durable, so not written: cut it back (a full disk, a failed fsync) before the
            # caller reports the failure. A reader that raced in between sees at most a torn tail.
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
        if created:  # the new file's name must be as durable as its bytes
            storage.fsync_dir(os.path.dirname(os.path.abspath(log_path)))
        return os.fstat(fd).st_size
    finally:
        os.close(fd)



def frames(log_path: str, offset: int) -> Iterator[tuple[Optional[Record], int, bytes]]:
    """(record, offset just past it, its header) for each frame after byte `offset`; the record
    is None (and the header empty) for a frame or bytes that are skipped. A reader records its
    position only once it has applied the record, so a failure in between never loses one; and
    with the header it can tell later whether the bytes it applied are still there.

    Stops before a frame that runs past the end of the file (still being written, or torn by a
    crash). A frame with an intact header but a wrong payload checksum is skipped by its length;
    only a damaged header makes the reader scan, for the next intact current-format header."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return
    pos = 0
    while pos + _LEGACY_HEAD.size <= len(data):
        magic, length, crc = _LEGACY_HEAD.unpack_from(data, pos)
        if magic == MAGIC and pos + _HEAD.size > len(data):
            return  # a header still being written
        if magic == MAGIC and _intact(data, pos):
            head = _HEAD.size
        elif magic == LEGACY_MAGIC:
            head = _LEGACY_HEAD.size
        else:  # damaged bytes: resume at the next intact header, if any is complete yet
            nxt = data.find(MAGIC, pos + 1)
            while nxt >= 0 and nxt + _HEAD.size <= len(data) and not _intact(data, nxt):
                nxt = data.find(MAGIC, nxt + 1)
            if nxt < 0 or nxt + _HEAD.size > len(data):
                return
            yield None, offset + nxt, b""
            pos = nxt
            continue
        end = pos + head + length
        if end > len(data):
            return  # incomplete: never look inside it
        payload = data[pos + head : end]
        yield (Record.decode(payload) if zlib.crc32(payload) == crc else None), offset + end, data[pos : pos + head]
        pos = end


def read_from(log_path: str, offset: int) -> tuple[list[Record], int]:
    """Valid records after byte `offset`, and the offset to resume from (see `frames`)."""
    out, end = [], offset
    for record, end, _ in frames(log_path, offset):
        if record is not None:
            out.append(record)
    return out, end


def _intact(data: bytes, pos: int) -> bool:
    """Whether a current-format header at `pos` matches its own checksum."""
    return zlib.crc32(data[pos : pos + 12]) == _HEAD.unpack_from(data, pos)[3]
