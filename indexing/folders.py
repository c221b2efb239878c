"""An index per folder of the user's photos: where it lives, and whether it still matches the folder.

`make run IMAGES=~/photos` serves the index of that folder, building it when it is missing or
when the folder changed since the build. The index directory records what it was built from in
`built-from.json` (the folder and a digest of its files' names, sizes and times); a folder whose
digest differs is stale. An index that has taken writes since its build (`live.took_writes`) is
never rebuilt behind the user's back: those writes would be lost."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from indexing import live, storage

RECORD = "built-from.json"


def default_index_dir(images: str, root: str = "data/indexes") -> str:
    """data/indexes/<folder name>-<hash of its absolute path>: one index per folder, readable names."""
    path = os.path.realpath(images)
    return os.path.join(root, f"{Path(path).name or 'root'}-{hashlib.sha256(path.encode()).hexdigest()[:8]}")


def listing(images: str, extensions: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every image under the folder, sorted."""
    out = []
    for uri, rel in storage.list_files(images, extensions):
        st = os.stat(uri)
        out.append((rel, st.st_size, st.st_mtime_ns))
    return sorted(out)


def digest(files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def state(images: str, index_dir: str, extensions: tuple[str, ...]) -> str:
    """missing (no index), current, stale (the folder changed; no writes since the build), or
    stale-with-writes (the folder changed and the index holds writes made through the service)."""
    if not Path(index_dir, "manifest.json").is_file():
        return "missing"
    try:
        recorded = json.loads(Path(index_dir, RECORD).read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("folder") == os.path.realpath(images) and recorded.get("digest") == digest(listing(images, extensions)):
        return "current"
    return "stale-with-writes" if live.took_writes(index_dir) else "stale"


def record(images: str, index_dir: str, extensions: tuple[str, ...]) -> None:
    """Note in the index directory which folder, with which files, it was built from."""
    files = listing(images, extensions)
    Path(index_dir, RECORD).write_text(json.dumps({"folder": os.path.realpath(images), "images": len(files),
                                                   "digest": digest(files)}, indent=1))


def sample_image(sources: list[str], extensions: tuple[str, ...]) -> Optional[str]:
    """A real image file of the index to put in the printed curl: the demo's first original when
    the index is the demo's (it comes back first, followed by its edited copies), else the first
    image of the first local folder the index was built from."""
    for source in sources:
        if not storage.is_local(source) or not os.path.isdir(source):
            continue
        originals = sorted(Path(source).glob("*/original.jpg"))
        if originals:
            return str(originals[0])
        first = next(storage.list_files(source, extensions), None)
        if first:
            return first[0]
    return None
