"""Paths as URIs through pyarrow filesystems: local disk by default, object stores on a cluster.

Writes are atomic everywhere: on local disk a temporary file is fsynced and renamed over the
target; on object stores a single PUT is already all-or-nothing.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Callable, Iterator, Optional

import pyarrow.fs as pafs


# RFC 3986: a scheme is a letter, then letters, digits, "+", "-" or "."; and it starts the URI.
# `/data/a://b` has none: it is a local path with a colon in a folder's name.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """The URI's scheme in lower case ("s3", "file"), or "" for a plain local path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else ""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a URI or a plain local path."""
    if not scheme_of(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def relative_to(uri: str, roots: list[str]) -> Optional[str]:
    """The path of `uri` relative to the first of `roots` (folders or URI prefixes) holding it,
    after normalising away `.` and `..` (so `/data/a/../../etc/passwd` is not under `/data`);
    None when no root holds it. A root itself is relative path ``"."``."""
    def norm(u: str) -> str:
        scheme = scheme_of(u)
        path = u[len(scheme) + 3 :] if scheme else u
        if scheme in ("", "file"):  # a local path, absolute after normalising
            return posixpath.normpath("/" + path.lstrip("/"))
        return f"{scheme}://" + posixpath.normpath(path)

    target = norm(uri)
    for root in map(norm, roots):
        if root and target == root:
            return "."
        if root and target.startswith(root.rstrip("/") + "/"):
            return target[len(root.rstrip("/")) + 1 :]
    return None


def is_under(uri: str, roots: list[str]) -> bool:
    """Whether `uri` names something inside one of `roots` (see relative_to)."""
    return relative_to(uri, roots) is not None


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return scheme_of(uri) in ("", "file")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    if scheme_of(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    """True when a file or directory exists at `uri`."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


class SourceUnavailable(OSError):
    """An indexed image that cannot be read back: outside the index's folders, gone, or changed."""


def source_path(uri: str, roots: list[str]) -> Optional[str]:
    """`uri` when it lies under one of `roots`, else None. A local path is checked again after
    resolving symbolic links, so a link inside a root cannot lead outside it."""
    if not uri or not is_under(uri, roots):
        return None
    if not is_local(uri):
        return uri
    path = os.path.realpath(_local(uri))
    local_roots = [os.path.realpath(_local(r)) for r in roots if is_local(r)]
    return path if is_under(path, local_roots) else None


def _local(uri: str) -> str:
    """The path of a local URI (a plain path, or file:// in any case)."""
    return uri[len("file://") :] if scheme_of(uri) == "file" else uri


def read_source(uri: str, roots: list[str], matches: Optional[Callable[[bytes], bool]] = None) -> bytes:
    """The bytes of an indexed image, read only from `roots`, the folders the operator lets the
    service read (never from wherever a writer's `uri` points) and, given `matches`, only while they are still the
    indexed bytes. Raises SourceUnavailable."""
    path = source_path(uri, roots)
    if path is None:
        raise SourceUnavailable("the image's uri is not under a folder the service may read (the index's image "
                                "folders, serve.uri_roots, or one allowed with `python -m deployments allow`)")
    try:
        data = read_bytes(path)
    except OSError as e:
        raise SourceUnavailable(f"the image file cannot be read: {e}") from None
    if matches is not None and not matches(data):
        raise SourceUnavailable("the file at the image's uri changed since it was indexed")
    return data


def makedirs(uri: str) -> None:
    """Create a directory and its parents (a no-op on object stores)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_file_atomic(path: str, write: Callable[[str], None]) -> None:
    """Have `write(tmp)` produce a local file at a temporary path, then fsync it and rename it over
    `path`: readers see the old file or the complete new one. The temporary file is removed when
    anything fails (a full disk must not stay full of it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def write_parquet_atomic(uri: str, table) -> None:
    """Write an Arrow table as one parquet file, atomically (write_bytes_atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers see either the old file or the complete new one."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        write_file_atomic(path, write)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_folder(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a folder or prefix that exists; FileNotFoundError or NotADirectoryError
    otherwise. One metadata call: jobs run it before starting Ray, so a typo fails in a second."""
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such folder or prefix: {uri}")
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"--images must be a folder or prefix, not a file: {uri}")
    return fs, root


def list_files(uri: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """Yield (full path or URI, path relative to `uri`) for files under `uri` with one of `extensions`."""
    fs, root = check_folder(uri)
    prefix = "" if is_local(uri) else uri.split("://", 1)[0] + "://"
    exts = tuple(e.lower() for e in extensions)
    for fi in sorted(fs.get_file_info(pafs.FileSelector(root, recursive=True)), key=lambda f: f.path):
        if fi.type == pafs.FileType.File and fi.path.lower().endswith(exts):
            rel = posixpath.relpath(fi.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
            yield prefix + fi.path, rel
