"""Continuous ingest: send new images under a folder or URI prefix to a running service's write API.

Ids follow the service's own rule (POST /images): a file under a folder the index was built from
gets the id the build gives its relative path, so an image already indexed by a build or an
earlier ingest is recognised (GET /images/{id}, same sha256) and skipped; any other file gets an
id from its bytes, so two folders whose file names repeat (two cameras, two exports) never
collide, and the same photo sent twice is one image. A *different* photo under an indexed path
is an id collision: reported and left alone, unless `replace` overwrites the indexed one.
`prefix` instead names every file by `prefix/relative path` (ids of a namespace of one's own)."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from configs.progress import Progress
from indexing import storage
from indexing.build import assign_ids
from indexing.ids import derived_id

LOG = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    added: int = 0
    replaced: int = 0
    skipped: int = 0
    collided: int = 0
    failed: int = 0
    seconds: float = 0.0
    collisions: list[str] = field(default_factory=list)  # "relative path (id, indexed uri)" of each

    def line(self) -> str:
        rate = (self.added + self.replaced) / self.seconds if self.seconds else 0.0
        # Collisions and refusals are named only when there are some: "failed 0" read as a failure.
        extra = [f"replaced {self.replaced}"] if self.replaced else []
        extra += [f"{self.collided} id collisions"] if self.collided else []
        extra += [f"{self.failed} refused (above)"] if self.failed else []
        return (f"added {self.added} images, skipped {self.skipped} already present, "
                + "".join(f"{e}, " for e in extra) + f"in {self.seconds:.1f} s ({rate:.1f} images/s)")


def ingest(images: str, url: str, token: str, extensions: tuple[str, ...], concurrency: int = 4,
           prefix: str = "", replace: bool = False) -> IngestSummary:
    """PUT every image under `images` that the service does not hold yet, or holds with other
    bytes when `replace` (ids as the module docstring says)."""
    t0 = time.time()
    if storage.is_local(images):  # the service checks a uri against absolute folders
        images = os.path.abspath(os.path.expanduser(images))
    listed = list(storage.list_files(images, extensions))
    prefix = prefix.strip("/")
    path_ids = assign_ids([f"{prefix}/{rel}" for _, rel in listed]).tolist() if prefix else None
    summary = IngestSummary()
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers) as client:
        r = client.get("/stats")
        if r.status_code in (401, 403):
            raise PermissionError(f"the service refused the token: {r.text[:200]}")
        r.raise_for_status()
        sources = r.json().get("sources", [])

        def one(i: int) -> str:
            uri, rel = listed[i]
            data = storage.read_bytes(uri)
            id_ = path_ids[i] if path_ids is not None else derived_id(uri, data, sources)[0]
            r = client.get(f"/images/{id_}")
            held = r.status_code == 200
            if held and r.json()["sha256"] == hashlib.sha256(data).hexdigest():
                return "skipped"
            if held and not replace:
                summary.collisions.append(f"{rel} (id {id_}, indexed as {r.json().get('uri') or 'no uri'})")
                return "collided"
            r = client.put(f"/images/{id_}", params={"uri": uri}, content=data,
                           headers={"content-type": "application/octet-stream"})
            if r.status_code in (200, 201):
                return "replaced" if held else "added"
            LOG.warning("%s: %s %s", uri, r.status_code, r.text[:200])
            if r.status_code in (401, 403):
                raise PermissionError(f"the service refused the write token: {r.text[:200]}")
            if r.status_code == 422 and r.json().get("error", {}).get("code") == "invalid_uri":
                # Every file of this folder would be refused the same way: say how to allow it.
                raise ValueError(f"the service may not read files under {images}: let it, as its operator, with "
                                 f"`python -m deployments allow {images}` (or add the folder to serve.uri_roots "
                                 "of its config), then ingest again")
            return "failed"

        with ThreadPoolExecutor(concurrency) as pool, Progress("ingest", len(listed), "images", summary=False) as bar:
            for outcome in pool.map(one, range(len(listed))):
                setattr(summary, outcome, getattr(summary, outcome) + 1)
                bar.update()
    summary.seconds = time.time() - t0
    return summary
