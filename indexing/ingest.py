"""Continuous ingest: send new images under a folder or URI prefix to a running service's write API.

Ids come from paths relative to the root, exactly as in `indexing build`, so an image already
indexed by a build or an earlier ingest is recognised (GET /images/{id}) and skipped."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from indexing import storage
from indexing.build import assign_ids

LOG = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    added: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.added / self.seconds if self.seconds else 0.0
        return (f"added {self.added} images, skipped {self.skipped} already present, failed {self.failed}, "
                f"in {self.seconds:.1f} s ({rate:.1f} images/s)")


def ingest(images: str, url: str, token: str, extensions: tuple[str, ...], concurrency: int = 4) -> IngestSummary:
    """PUT every image under `images` whose id the service does not hold yet."""
    t0 = time.time()
    listed = list(storage.list_files(images, extensions))
    ids = assign_ids([rel for _, rel in listed])
    summary = IngestSummary()
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers) as client:

        def one(item) -> str:
            (uri, _), id_ = item
            r = client.get(f"/images/{id_}")
            if r.status_code == 200:
                return "skipped"
            r = client.put(f"/images/{id_}", params={"uri": uri}, content=storage.read_bytes(uri),
                           headers={"content-type": "application/octet-stream"})
            if r.status_code in (200, 201):
                return "added"
            LOG.warning("%s: %s %s", uri, r.status_code, r.text[:200])
            if r.status_code in (401, 403):
                raise PermissionError(f"the service refused the write token: {r.text[:200]}")
            if r.status_code == 422 and r.json().get("error", {}).get("code") == "invalid_uri":
                # Every file of this folder would be refused the same way: say how to allow it.
                raise ValueError(f"the service refuses uris under {images}: {r.json()['error']['message']} "
                                 f"(add {images} to serve.uri_roots of the service's config)")
            return "failed"

        with ThreadPoolExecutor(concurrency) as pool:
            for n, outcome in enumerate(pool.map(one, zip(listed, ids.tolist())), 1):
                setattr(summary, outcome, getattr(summary, outcome) + 1)
                if n % 100 == 0:
                    LOG.info("ingest progress: %d/%d", n, len(listed))
    summary.seconds = time.time() - t0
    return summary
