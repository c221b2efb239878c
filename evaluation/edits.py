"""Upload-like edits of an image, for near-duplicate robustness checks."""
from __future__ import annotations

import hashlib
import io
import math
import time
from typing import Sequence

import numpy as np

from PIL import Image

# Heavy edits: crop to 50% of the area, 15 degree rotation, strong colour change, JPEG quality 20.
HEAVY_EDITS = {"crop": (1 - 0.5 ** 0.5) / 2, "rotate": 15.0, "hue": 0.25, "saturation": 1.8, "scale": 0.6,
               "quality": 20}


def edited_copy(data: bytes, *, scale: float = 0.6, quality: int = 60, crop: float = 0.0, rotate: float = 0.0,
                hue: float = 0.0, saturation: float = 1.0) -> bytes:
    """Optional border crop (fraction per side), rotation (degrees, corners cropped off), hue shift
    (fraction of the colour wheel) and saturation factor, resize by `scale`, JPEG at `quality`."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if crop:
        dx, dy = int(w * crop), int(h * crop)
        img = img.crop((dx, dy, w - dx, h - dy))
        w, h = img.size
    if rotate:
        img = img.rotate(rotate, resample=Image.BILINEAR, expand=False)
        # keep the largest centred box free of the black corners
        a = abs(math.radians(rotate))
        k = 1.0 / (math.cos(a) + math.sin(a) * max(w, h) / min(w, h))
        cw, ch = int(w * k), int(h * k)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))
        w, h = img.size
    if hue or saturation != 1.0:
        hsv = np.asarray(img.convert("HSV")).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(round(hue * 256))) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        img = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    img = img.resize((max(16, int(w * scale)), max(16, int(h * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_duplicate_recalls(embedder, originals: list[bytes], edits: dict[str, dict]) -> dict[str, float]:
    """For each named edit, the rank-1 rate at which an edited copy's nearest original (exact
    cosine) is its own; the originals are embedded once."""
    x = embedder.embed_bytes(originals, for_index=True)
    out = {}
    for name, edit in edits.items():
        q = embedder.embed_bytes([edited_copy(d, **edit) for d in originals])
        out[name] = float((np.argmax(q @ x.T, axis=1) == np.arange(len(originals))).mean())
    return out


# The mild edit of `python -m evaluation edits`: what an upload usually does to a photo.
MILD_EDITS = {"crop": 0.05, "scale": 0.5, "quality": 50}


def verified_recall(embedder, gallery: list[bytes], queries: list[int], edit: dict, verify_top: Sequence[int],
                    min_inliers: int, decode) -> list[dict]:
    """Recall@1 and @10 of edited copies of `gallery[i]` for i in `queries`, searched by exact
    cosine over the whole gallery, then, for each N in `verify_top` (0: none), with the top N
    re-ranked by geometric verification (embedding.local_features) in the service's order
    (indexing.policy.verified_first). Also the cost: ms to extract the query's features, a
    candidate's and to verify one pair, so a query costs query + N x pair with the candidates'
    features at hand, plus N x candidate without; and for each N the embedding's recall@N, the
    share of originals verification can reach."""
    from embedding.local_features import features_of, match
    from indexing.policy import verified_first

    x = embedder.embed_bytes(gallery, for_index=True)
    copies = [edited_copy(gallery[i], **edit) for i in queries]
    q = embedder.embed_bytes(copies)
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, : max([10, *verify_top])]
    features: dict[int, object] = {}
    extract_s: dict[bool, list[float]] = {True: [], False: []}  # query (enlarged) or candidate: seconds
    pairs_s, pairs = 0.0, 0

    def feats(data: bytes, query: bool = False):
        t = time.perf_counter()
        f = features_of(data, max_bytes=decode.max_bytes, max_pixels=decode.max_pixels, query=query)
        extract_s[query].append(time.perf_counter() - t)
        return f

    rows = []
    for n in verify_top:
        hits1 = hits10 = held = 0
        for qi, (target, copy) in enumerate(zip(queries, copies)):
            ranked = list(order[qi])
            held += target in ranked[:n]
            if n:
                fq = feats(copy, query=True)
                head = ranked[:n]
                for c in head:
                    if c not in features:
                        features[c] = feats(gallery[c])
                t = time.perf_counter()
                found = {int(c): match(fq, features[c]) for c in head}
                pairs_s, pairs = pairs_s + time.perf_counter() - t, pairs + len(head)
                ranked = [r["id"] for r in verified_first([{"id": int(c)} for c in ranked],
                                                          {c: (m.inliers, m.coverage) for c, m in found.items()},
                                                          min_inliers)]
            hits1 += ranked[0] == target
            hits10 += target in ranked[:10]
        rows.append({"verify_top": n, "recall@1": round(hits1 / len(queries), 4),
                     "recall@10": round(hits10 / len(queries), 4),
                     # the ceiling of re-ranking: the embedding's recall@N
                     **({"shortlist_recall": round(held / len(queries), 4)} if n else {})})
    ms = {kind: round(1000 * float(np.mean(v)), 2) if v else None for kind, v in extract_s.items()}
    cost = {"query_extract_ms": ms[True], "candidate_extract_ms": ms[False],
            "verify_pair_ms": round(1000 * pairs_s / pairs, 3) if pairs else None}
    for r in rows:
        n = r["verify_top"]
        if n and cost["verify_pair_ms"] is not None:
            r.update(cost)
            r["ms_per_query_cached"] = round(cost["query_extract_ms"] + n * cost["verify_pair_ms"], 1)
            r["ms_per_query_uncached"] = round(r["ms_per_query_cached"] + n * cost["candidate_extract_ms"], 1)
    return rows


# Edits a copy-collapse should catch, mildest first, and one it should not have to.
COPY_EDITS = {
    "resize 50%, JPEG q50": {"scale": 0.5, "quality": 50},
    "crop 2%/side, 50%, q40": {"crop": 0.02, "scale": 0.5, "quality": 40},
    "crop 5%/side, 60%, q60": {"crop": 0.05, "scale": 0.6, "quality": 60},
    "crop 10%/side, 60%, q60": {"crop": 0.10, "scale": 0.6, "quality": 60},
}


def copy_hash_report(originals: list[bytes], image_size: int, threshold: int, decode) -> list[dict]:
    """Perceptual-hash bits between each image and its edited copies (COPY_EDITS), and between each
    image and its nearest other image (byte-identical pairs left out): the calibration of
    `serve.near_duplicate_bits`. One row per case with percentiles and the share within `threshold`."""
    from embedding.copies import hash_distance, perceptual_hash
    from embedding.decode import decode_image, resize_rgb

    def hashes(blobs: list[bytes]) -> np.ndarray:
        return np.array([perceptual_hash(resize_rgb(decode_image(b, max_bytes=decode.max_bytes,
                                                                 max_pixels=decode.max_pixels, draft=image_size),
                                                    image_size))
                         for b in blobs], np.int64)

    def row(case: str, d: np.ndarray) -> dict:
        p = np.percentile(d, [1, 5, 50, 95, 99])
        return {"case": case, "n": len(d), "min": int(d.min()), "p1": p[0], "p5": p[1], "median": p[2], "p95": p[3],
                "p99": p[4], "max": int(d.max()), f"share<={threshold}": float((d <= threshold).mean())}

    h = hashes(originals)
    rows = [row(name, hash_distance(hashes([edited_copy(b, **e) for b in originals]), h))
            for name, e in COPY_EDITS.items()]
    d = hash_distance(h[:, None], h[None, :])
    d[np.eye(len(h), dtype=bool)] = 99
    same = np.array([hashlib.sha256(b).digest() for b in originals])
    d[same[:, None] == same[None, :]] = 99  # identical files are copies, not distinct images
    rows.append(row("nearest distinct image", d.min(axis=1)))
    return rows
