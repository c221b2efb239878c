"""Continuous ingest: send new images under a folder or URI prefix to a running service's write API.

Ids come from paths relative to the root, exactly as in `indexing build`, so an image already
indexed by a build or an earlier ingest is recognised (GET /images/{id}, same sha256) and skipped.
A *different* photo under an indexed path is an id collision: reported and left alone, unless
`prefix` puts this folder's ids in a namespace of their own or `replace` overwrites the indexed one."""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from configs.progress import Progress
from indexing import storage
from indexing.build import assign_ids

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
        replaced = f"replaced {self.replaced}, " if self.replaced else ""
        return (f"added {self.added} images, {replaced}skipped {self.skipped} already present, "
                f"{self.collided} id collisions, failed {self.failed}, in {self.seconds:.1f} s ({rate:.1f} images/s)")


def ingest(images: str, url: str, token: str, extensions: tuple[str, ...], concurrency: int = 4,
           prefix: str = "", replace: bool = False) -> IngestSummary:
    """PUT every image under `images` whose id the service does not hold yet (ids from
    `prefix/relative path`), or holds with other bytes when `replace`."""
    t0 = time.time()
    listed = list(storage.list_files(images, extensions))
    prefix = prefix.strip("/")
    ids = assign_ids([f"{prefix}/{rel}" if prefix else rel for _, rel in listed])
    summary = IngestSummary()
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers) as client:

        def one(item) -> str:
            (uri, rel), id_ = item
            data = storage.read_bytes(uri)
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
                raise ValueError(f"the service refuses uris under {images}: {r.json()['error']['message']} "
                                 f"(add {images} to serve.uri_roots of the service's config)")
            return "failed"

        with ThreadPoolExecutor(concurrency) as pool, Progress("ingest", len(listed), "images", summary=False) as bar:
            for outcome in pool.map(one, zip(listed, ids.tolist())):
                setattr(summary, outcome, getattr(summary, outcome) + 1)
                bar.update()
    summary.seconds = time.time() - t0
    return summary
