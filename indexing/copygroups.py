"""Copy groups: which indexed images are copies of each other, over a whole index.

1. Candidates (a Ray Data job over the shards): every slice of every shard's vectors is searched
   against all shards, as the service fans a query out (indexing.readers), visiting
   `corpus.nprobe` cells, and each image's `corpus.neighbours` nearest vectors scoring at least
   `corpus.min_score` become candidate pairs.
2. Confirmation, pair by pair (`confirm`): the same bytes (sha256) are a copy; otherwise, where
   both images are readable and carry keypoints, geometric verification decides, as the verified
   search path does (indexing.verification: local features + RANSAC, `serve.verify_min_inliers`);
   where it cannot, the search path's hash rule (`serve.near_duplicate_bits`, between vectors that
   agree too: `corpus.hash_min_score`), and where an image was indexed without pixels (no hash),
   a score at or above `corpus.sure_score`. Verification runs as Ray tasks: features
   once per image, then chunks of pairs.
3. Groups: connected components of the confirmed pairs. Each group's representative is its
   largest member (pixels, as the build recorded them), the one indexed by the build before one
   written later, then the first by uri.

Why verification has the last word where it can speak: at corpus scale a perceptual hash within
12 bits joins distinct photos (two highway shots of scene15 differ by 10 bits), and a heavily
edited copy scores below many distinct photos of the same kind of scene. Every candidate a hash or
a score would accept is therefore verified when its images can be read.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.progress import Progress, poll, replace_ray_data_bars
from configs.schema import AppConfig
from embedding.copies import hash_distance
from indexing import storage
from indexing.catalog import HASHED, PRIVATE, UNSAFE, sha_keys
from indexing.manifest import read_manifest


# How a pair was confirmed, strongest first; a member is marked with its strongest link.
CONFIRMATIONS = ("sha256", "verified", "hash", "score")
GROUPS_FILE, PAIRS_FILE, SUMMARY_FILE, FAILED_FILE = "groups.parquet", "pairs.parquet", "summary.json", "failed.jsonl"
GROUPS_SCHEMA = pa.schema([("group", pa.int64()), ("id", pa.int64()), ("uri", pa.string()),
                           ("representative", pa.int64()), ("confirmed", pa.string()), ("private", pa.bool_()),
                           ("unsafe", pa.bool_())])


@dataclass
class GroupsSummary:
    images: int
    groups: int
    grouped: int
    candidates: int
    verified: int    # candidate pairs local features judged (copies or not)
    copies: int      # candidate pairs confirmed as copies, by any rule
    unreadable: int
    seconds: float

    def line(self) -> str:
        share = 100.0 * self.grouped / self.images if self.images else 0.0
        unreadable = f", {self.unreadable} images unreadable ({FAILED_FILE})" if self.unreadable else ""
        return (f"{self.images} images, {self.groups} copy groups, {self.grouped} images in groups ({share:.1f}%); "
                f"{self.candidates} candidate pairs ({self.verified} judged by local features), {self.copies} "
                f"confirmed copies{unreadable}; in {self.seconds:.1f} s")


# ---------------------------------------------------------------- plain logic


def candidate_pairs(ids: np.ndarray, D: np.ndarray, I: np.ndarray, min_score: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, score) with a < b of every hit I[i, j] of query ids[i] other than itself scoring at
    least `min_score`."""
    a = np.broadcast_to(np.asarray(ids, np.int64)[:, None], I.shape)
    keep = (I >= 0) & (I != a) & (D >= min_score)
    a, b, s = a[keep], I[keep], D[keep]
    return np.minimum(a, b), np.maximum(a, b), s.astype(np.float32)


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair once, with its best score (a pair is usually found from both of its sides)."""
    if not len(a):
        return a, b, s
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[first], b[first], s[first]


@dataclass
class Catalog:
    """Per-id metadata of the whole index, sorted by id (catalog.SCHEMA plus the pixels the build
    recorded and whether the build indexed it)."""

    ids: np.ndarray
    uri: list
    sha64: np.ndarray
    phash: np.ndarray
    flags: np.ndarray
    pixels: np.ndarray
    built: np.ndarray

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ids (all present)."""
        return np.searchsorted(self.ids, ids)


def read_catalog_of(tables: list[pa.Table], built: Optional[pa.Table]) -> Catalog:
    """A Catalog from the shards' metadata tables and the version's catalog.parquet (id, width,
    height, sha256), whose rows still holding the same bytes count as indexed by the build."""
    t = pa.concat_tables(tables)
    t = t.take(np.argsort(t.column("id").to_numpy(), kind="stable"))
    ids = t.column("id").to_numpy()
    pixels, in_build = np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    if built is not None and built.num_rows and len(ids):
        bid = built.column("id").to_numpy()
        pos = np.clip(np.searchsorted(ids, bid), 0, len(ids) - 1)
        there = ids[pos] == bid
        same = there & (sha_keys(built.column("sha256").combine_chunks()) == t.column("sha64").to_numpy()[pos])
        if "width" in built.column_names:
            px = built.column("width").fill_null(0).to_numpy() * built.column("height").fill_null(0).to_numpy()
            pixels[pos[same]] = px[same]
        in_build[pos[same]] = True
    return Catalog(ids, t.column("uri").to_pylist(), t.column("sha64").to_numpy(), t.column("phash").to_numpy(),
                   t.column("flags").to_numpy(), pixels, in_build)


def confirm(cat: Catalog, a: np.ndarray, b: np.ndarray, score: np.ndarray, inliers: np.ndarray,
            contained: np.ndarray, *, copy_bits: Optional[int], min_inliers: int, min_contained: float,
            hash_min_score: float, sure_score: float) -> np.ndarray:
    """How each pair (a[i], b[i]) is confirmed a copy (a CONFIRMATIONS name), or "" when it is
    not. `inliers` and `contained` are the verification's answer (embedding.local_features.Match),
    -1 where it could not be made (unread images, too few keypoints, verification off): only then
    do the hash rule (with a score of at least `hash_min_score`: flat pictures without keypoints
    share hashes with each other) and, where either image has no hash (indexed from vectors:
    nothing to compare or verify), `sure_score` decide. A verified copy needs, beyond the search path's
    inliers, the smaller picture inside the larger (`min_contained`): an overlapping shot of the
    same scene has as many inliers, and in a group one false link joins two whole groups."""
    pa_, pb = cat.rows(a), cat.rows(b)
    how = np.full(len(a), "", dtype=object)
    same_bytes = (cat.sha64[pa_] == cat.sha64[pb]) & (cat.sha64[pa_] != 0)
    decided = inliers >= 0
    how[decided & (inliers >= min_inliers) & (contained >= min_contained)] = "verified"
    hashed = ((cat.flags[pa_] & HASHED) != 0) & ((cat.flags[pb] & HASHED) != 0)
    if copy_bits is not None:
        near = hashed & (hash_distance(cat.phash[pa_], cat.phash[pb]) <= copy_bits)
        how[~decided & near & (score >= hash_min_score)] = "hash"
    # A score decides only where an image was indexed without pixels: a label-trained model packs
    # a whole category above any such bound (README: Copies of one image).
    how[~decided & ~hashed & (score >= sure_score)] = "score"
    how[same_bytes] = "sha256"
    return how


def components(n: int, a_pos: np.ndarray, b_pos: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes under the edges (a_pos[i], b_pos[i])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a_pos), np.int8), (a_pos, b_pos)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def groups_table(cat: Catalog, a: np.ndarray, b: np.ndarray, how: np.ndarray) -> pa.Table:
    """One row per image in a group of two or more: group (0 = the largest group), id, uri,
    representative (the group's representative id), confirmed (its strongest confirmed link),
    private, unsafe (operators see flagged images grouped too; nothing else shows them)."""
    ok = how != ""
    pa_, pb = cat.rows(a[ok]), cat.rows(b[ok])
    labels = components(len(cat.ids), pa_, pb)
    strength = np.full(len(cat.ids), len(CONFIRMATIONS), np.int64)
    rank = np.array([CONFIRMATIONS.index(h) for h in how[ok]], np.int64)
    np.minimum.at(strength, pa_, rank)
    np.minimum.at(strength, pb, rank)
    members = np.flatnonzero(strength < len(CONFIRMATIONS))
    if not len(members):
        return GROUPS_SCHEMA.empty_table()
    uris = np.array(cat.uri, dtype=object)
    # Representative first within each component: most pixels, indexed by the build, then uri.
    order = members[np.lexsort((uris[members].astype(str), ~cat.built[members], -cat.pixels[members],
                                labels[members]))]
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rep = np.repeat(cat.ids[order[starts]], sizes)
    # Group numbers by size, largest first (ties: the representative's id).
    by_size = np.lexsort((cat.ids[order[starts]], -sizes))
    number = np.empty(len(starts), np.int64)
    number[by_size] = np.arange(len(starts))
    group = np.repeat(number, sizes)
    table = pa.table({
        "group": group, "id": cat.ids[order], "uri": uris[order].tolist(), "representative": rep,
        "confirmed": [CONFIRMATIONS[s] for s in strength[order]],
        "private": (cat.flags[order] & PRIVATE) != 0, "unsafe": (cat.flags[order] & UNSAFE) != 0,
    }, schema=GROUPS_SCHEMA)
    return table.take(np.lexsort((table.column("id").to_numpy(), table.column("group").to_numpy())))


# ---------------------------------------------------------------- Ray stages


class FindCandidates:
    """Ray Data actor: searches slices of shards' vectors against every shard (indexing.readers)
    and returns their candidate pairs. Each slice done is added to `tally` (build.Tally)."""

    def __init__(self, readers: list, index_dir: str, version: int, k: int, nprobe: Optional[int],
                 min_score: float, tally=None):
        import ray

        from indexing.manifest import read_manifest
        from indexing.readers import JobRouter

        self.readers, self.k, self.nprobe, self.min_score, self.tally = readers, k, nprobe, min_score, tally
        self.router = JobRouter(readers, index_dir, read_manifest(index_dir, version))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        import ray

        parts = []
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            ids, x = ray.get(self.readers[int(shard)].vectors.remote(int(start), int(stop)))
            if len(ids):
                hits = self.router.search(x, self.k + 1, self.nprobe)  # +1: an image finds itself
                parts.append(candidate_pairs(ids, hits.scores, hits.ids, self.min_score))
            if self.tally is not None:
                self.tally.add.remote(int(stop) - int(start), self.node)
        a, b, s = (np.concatenate(c) for c in zip(*parts)) if parts else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),)
        return {"a": a, "b": b, "score": s}


def extract_features(items: list[tuple[int, str, int]], roots: list[str], decode: dict) -> dict:
    """Ray task: {id: (candidate features, query features, pixels) or why it is unreadable} of
    (id, uri, sha64) items, read as the verified search reads a candidate (only from `roots`, only
    while it holds the indexed bytes); the query features of a small image are taken enlarged, as
    a search's query is (embedding.local_features). Pixels are the full image's width x height
    (features are taken at most MAX_SIDE wide, which hides which of two large images is a crop)."""
    import cv2

    from configs.schema import DecodeConfig
    from embedding.decode import ImageDecodeError, decode_image
    from embedding.local_features import ENLARGE_BELOW, MAX_SIDE, extract
    from indexing.verification import read_indexed

    d = DecodeConfig(**decode)
    out: dict = {}
    for id_, uri, sha64 in items:
        try:
            data = read_indexed(uri, sha64, roots)
            img = decode_image(data, max_bytes=d.max_bytes, max_pixels=d.max_pixels, draft=MAX_SIDE)
            rgb = np.asarray(img)
            candidate = extract(rgb)
            query = extract(rgb, enlarge=True) if max(rgb.shape[:2]) < ENLARGE_BELOW else candidate
            width, height = img.info.get("full_size", img.size)
            out[id_] = (candidate, query, width * height)
        except storage.SourceUnavailable as e:
            out[id_] = str(e)
        except (ImageDecodeError, cv2.error) as e:
            out[id_] = f"cannot be decoded: {e}"
    return out


def verify_pairs(a: np.ndarray, b: np.ndarray, feature_refs: list, min_keypoints: int) -> np.ndarray:
    """Ray task: (inliers, contained) of each pair (a[i], b[i]) as an (n, 2) array, the image with
    fewer pixels as the query (as a search's edited copy is); -1 where either image is unreadable
    or has under `min_keypoints` keypoints (verification cannot tell)."""
    import cv2
    import ray

    from embedding.local_features import match

    feats: dict = {}
    for part in ray.get(feature_refs):
        feats.update(part)
    out = np.full((len(a), 2), -1.0)
    for i, pair in enumerate(zip(a.tolist(), b.tolist())):
        fa, fb = feats.get(pair[0]), feats.get(pair[1])
        if not isinstance(fa, tuple) or not isinstance(fb, tuple):
            continue
        query, candidate = (fa[1], fb[0]) if fa[2] <= fb[2] else (fb[1], fa[0])
        if min(len(query.descriptors), len(candidate.descriptors)) < min_keypoints:
            continue
        try:
            m = match(query, candidate)
        except cv2.error:  # a degenerate pair cannot be judged; the others still are
            continue
        out[i] = (m.inliers, m.contained)
    return out


# ---------------------------------------------------------------- the job


def copy_groups(index_dir: str, out: str, cfg: AppConfig, nprobe: Optional[int] = None,
                allow: Optional[list[str]] = None) -> GroupsSummary:
    """Find the copy groups of an index directory (module docstring) and write them under `out`:
    groups.parquet, pairs.parquet (every candidate pair, its score, hash bits, inliers and how it
    was confirmed), failed.jsonl (images verification could not read) and summary.json. Images
    are read, as the service reads them, from the index's folders, `serve.uri_roots` and `allow`."""
    import ray

    from indexing.build import Tally, fit_cpus, write_failed_rows
    from indexing.readers import open_readers

    t0 = time.time()
    c = cfg.corpus
    manifest = read_manifest(index_dir)
    if manifest.metric != "ip":
        raise ValueError(f"copy-groups compares cosine scores; the index at {index_dir} has metric "
                         f"{manifest.metric!r} (build it with index.metric: ip)")
    readers = open_readers(index_dir, manifest, fit_cpus(c.reader_cpus * manifest.num_shards) / manifest.num_shards,
                           include_hidden=True)
    tally = ray.remote(num_cpus=0)(Tally).remote()
    try:
        tables = ray.get([r.table.remote() for r in readers])
        slices = [(s, a, b) for s, parts in enumerate(ray.get([r.slices.remote(c.chunk) for r in readers]))
                  for a, b in parts]
        total = sum(b - a for _, a, b in slices)
        ds = ray.data.from_items([{"shard": s, "start": a, "stop": b} for s, a, b in slices] or [{"shard": 0, "start": 0, "stop": 0}])
        ds = ds.map_batches(
            FindCandidates, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(c.search_actors, len(slices)))),
            num_cpus=fit_cpus(c.search_actor_cpus * c.search_actors) / c.search_actors,
            fn_constructor_kwargs=dict(readers=readers, index_dir=index_dir, version=manifest.version,
                                       k=c.neighbours, nprobe=nprobe or c.nprobe, min_score=c.min_score,
                                       tally=tally))
        replace_ray_data_bars()
        parts = []
        with Progress("copy candidates", total, "images") as progress:
            stop = poll(progress, lambda: ray.get(tally.get.remote()))
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    parts.append((batch["a"], batch["b"], batch["score"]))
            finally:
                stop()
            progress.update_to(ray.get(tally.get.remote()))
        per_node = ray.get(tally.by_key.remote())
    finally:
        for actor in [*readers, tally]:
            ray.kill(actor)
    a, b, score = unique_pairs(*(np.concatenate(p) for p in zip(*parts))) if parts else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    cat = read_catalog_of(tables, _built(index_dir, manifest))
    # An image written while the job ran can be a hit without a row in the tables read first:
    # it is grouped by the next run.
    known = np.isin(a, cat.ids) & np.isin(b, cat.ids)
    a, b, score = a[known], b[known], score[known]
    pos_a, pos_b = cat.rows(a), cat.rows(b)
    result = np.full((len(a), 2), -1.0)
    failed: dict[int, str] = {}
    # Images indexed from vectors have no pixels to read (no hash, no uri): nothing to verify.
    ask = np.flatnonzero((cat.sha64[pos_a] != cat.sha64[pos_b]) & ((cat.flags[pos_a] & cat.flags[pos_b] & HASHED) != 0))
    if c.verify and len(ask):
        roots = cfg.serve.uri_roots + list(allow or []) + list(manifest.sources)
        result[ask], failed = _verify(cat, a[ask], b[ask], roots, cfg)
    how = confirm(cat, a, b, score, result[:, 0], result[:, 1], copy_bits=cfg.serve.near_duplicate_bits,
                  min_inliers=cfg.serve.verify_min_inliers, min_contained=c.min_contained,
                  hash_min_score=c.hash_min_score, sure_score=c.sure_score)
    groups = groups_table(cat, a, b, how)
    storage.makedirs(out)
    storage.write_parquet_atomic(storage.join(out, GROUPS_FILE), groups)
    hashed = ((cat.flags[pos_a] & HASHED) != 0) & ((cat.flags[pos_b] & HASHED) != 0)
    bits = np.where(hashed, hash_distance(cat.phash[pos_a], cat.phash[pos_b]), -1)
    storage.write_parquet_atomic(storage.join(out, PAIRS_FILE), pa.table({
        "a": a, "b": b, "score": score, "hash_bits": bits.astype(np.int64), "inliers": result[:, 0].astype(np.int64),
        "contained": result[:, 1].astype(np.float32), "confirmed": pa.array(how.tolist(), pa.string())}))
    write_failed_rows(storage.join(out, FAILED_FILE),
                      ((cat.uri[p], e) for p, e in zip(cat.rows(np.fromiter(failed, np.int64, len(failed))), failed.values())))
    summary = GroupsSummary(images=len(cat.ids), groups=len(set(groups.column("group").to_pylist())),
                            grouped=groups.num_rows, candidates=len(a), verified=int((result[:, 0] >= 0).sum()),
                            copies=int((how != "").sum()), unreadable=len(failed), seconds=time.time() - t0)
    storage.write_bytes_atomic(storage.join(out, SUMMARY_FILE), json.dumps({
        **summary.__dict__, "index_dir": index_dir, "version": manifest.version,
        "confirmed": {h: int((how == h).sum()) for h in CONFIRMATIONS}, "corpus": c.model_dump(),
        "searched_per_node": per_node,
        "near_duplicate_bits": cfg.serve.near_duplicate_bits, "verify_min_inliers": cfg.serve.verify_min_inliers},
        indent=1).encode())
    return summary


def _built(index_dir: str, manifest) -> Optional[pa.Table]:
    """The version's catalog.parquet (id, sha256 and, from an image build, width and height)."""
    import io

    try:
        data = io.BytesIO(storage.read_bytes(storage.join(index_dir, manifest.catalog)))
    except (FileNotFoundError, OSError):
        return None
    cols = [c for c in ("id", "sha256", "width", "height") if c in pq.read_schema(data).names]
    return pq.read_table(data, columns=cols)


def _verify(cat: Catalog, a: np.ndarray, b: np.ndarray, roots: list[str], cfg: AppConfig
            ) -> tuple[np.ndarray, dict[int, str]]:
    """(inliers, contained) of each pair by Ray tasks: features once per image, then chunks of
    pairs; and {id: why} of the images that could not be read."""
    import ray

    from indexing.build import fit_cpus

    c = cfg.corpus
    cpus = fit_cpus(c.verify_task_cpus)
    needed = np.unique(np.concatenate([a, b]))
    per_task = 64
    extract = ray.remote(num_cpus=cpus)(extract_features)
    batches = [needed[s : s + per_task] for s in range(0, len(needed), per_task)]
    refs = []
    with Progress("features", len(needed), "images") as progress:
        for ids in batches:
            p = cat.rows(ids)
            refs.append(extract.remote([(int(i), cat.uri[j], int(cat.sha64[j])) for i, j in zip(ids, p)], roots,
                                       cfg.decode.model_dump()))
        size = {ref: len(ids) for ref, ids in zip(refs, batches)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            progress.update(size[done[0]])
    batch_of = np.repeat(np.arange(len(batches)), [len(x) for x in batches])
    failed = {}
    for part in ray.get(refs):
        failed.update({i: v for i, v in part.items() if isinstance(v, str)})
    task = ray.remote(num_cpus=cpus)(verify_pairs)
    order = np.lexsort((b, a))
    chunks = [order[s : s + c.verify_pairs_per_task] for s in range(0, len(order), c.verify_pairs_per_task)]
    out = np.full((len(a), 2), -1.0)
    with Progress("verifying", len(a), "pairs") as progress:
        running: dict = {}
        todo = list(chunks)
        while todo or running:
            while todo and len(running) < c.verify_tasks:
                rows = todo.pop(0)
                need = np.unique(batch_of[np.searchsorted(needed, np.concatenate([a[rows], b[rows]]))])
                running[task.remote(a[rows], b[rows], [refs[i] for i in need], cfg.serve.verify_min_inliers)] = rows
            done, _ = ray.wait(list(running), num_returns=1)
            rows = running.pop(done[0])
            out[rows] = ray.get(done[0])
            progress.update(len(rows))
    return out, failed
