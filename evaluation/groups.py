"""Quality of copy groups (`python -m indexing copy-groups`) against planted copies.

The corpus is a folder of photos plus, for some of them, edited copies under other names
(evaluation.edits transforms); the truth is which photo each file shows. A grouping is judged by
pairs: precision, the share of pairs put in one group that show one photo; recall, the share of
(original, copy) pairs put in one group, per kind of edit.
"""
from __future__ import annotations

import csv
import hashlib
import os
from itertools import combinations

import numpy as np

from evaluation.edits import HEAVY_EDITS, MILD_EDITS, edited_copy

# Two mild and two heavy edits per copied photo: what uploads do, and what a re-poster does.
CORPUS_EDITS = {
    "mild-1": MILD_EDITS,
    "mild-2": {"crop": 0.02, "scale": 0.7, "quality": 40},
    "heavy-1": HEAVY_EDITS,
    "heavy-2": {**HEAVY_EDITS, "rotate": -HEAVY_EDITS["rotate"], "hue": -HEAVY_EDITS["hue"], "saturation": 0.5},
}
TRUTH = "truth.csv"


def write_copy_corpus(root: str, paths: list[str], out: str, copied: int, seed: int = 0) -> list[dict]:
    """Copy the photos at `paths` (relative to `root`) into `out/photos/`, and write CORPUS_EDITS
    copies of `copied` of them, chosen at random, into `out/copies/` under unrelated names. Writes
    and returns the truth: one row per file, {"path" (relative to out), "photo", "edit", "source"
    (the photo's path under root)}. A photo is
    its bytes' sha256, so byte-identical originals (scene15 has two pairs) count as one photo."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(paths), size=min(copied, len(paths)), replace=False).tolist())
    rows = []
    for i, rel in enumerate(paths):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        photo = hashlib.sha256(data).hexdigest()[:16]
        ext = os.path.splitext(rel)[1]
        target = os.path.join("photos", f"{i:06d}{ext}")
        _write(os.path.join(out, target), data)
        rows.append({"path": target, "photo": photo, "edit": "original", "source": rel})
        if i in chosen:
            for name, edit in CORPUS_EDITS.items():
                # The name says nothing of the source: grouping must come from the pixels.
                target = os.path.join("copies", hashlib.sha256(f"{seed}/{i}/{name}".encode()).hexdigest()[:12] + ".jpg")
                _write(os.path.join(out, target), edited_copy(data, **edit))
                rows.append({"path": target, "photo": photo, "edit": name, "source": rel})
    with open(os.path.join(out, TRUTH), "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "photo", "edit", "source"])
        w.writeheader()
        w.writerows(rows)
    return rows


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_truth(corpus: str, same_photo: str | None = None) -> list[dict]:
    """The truth rows write_copy_corpus wrote. `same_photo` names a CSV of pairs of source paths
    (a,b) that show one photo although their bytes differ (a photo set's own copies, checked by
    eye): their files then count as copies of one photo."""
    with open(os.path.join(corpus, TRUTH), newline="") as f:
        rows = list(csv.DictReader(f))
    if same_photo:
        photo_of = {r["source"]: r["photo"] for r in rows}
        with open(same_photo, newline="") as f:
            merged = {photo_of[b]: photo_of[a] for a, b in csv.reader(f) if a in photo_of and b in photo_of}
        for r in rows:
            r["photo"] = merged.get(r["photo"], r["photo"])
    return rows


def pairwise_quality(group_of: dict[str, int], truth: list[dict]) -> dict:
    """Pairwise precision and recall of a grouping. `group_of` maps a corpus path (as in the truth)
    to its group id; a path not in it is alone. `wrong` names the photos (by their original's
    path) whose files were grouped together. Recall is given over the (original, copy) pairs of
    each edit kind ("mild", "heavy") and over every pair of files of one photo ("all")."""
    photo = {r["path"]: r["photo"] for r in truth}
    members: dict[int, list[str]] = {}
    for path, g in group_of.items():
        members.setdefault(g, []).append(path)
    original = {r["photo"]: r["path"] for r in truth if r["edit"] == "original"}
    grouped = same = 0
    wrong: dict[tuple[str, str], int] = {}
    for paths in members.values():
        for a, b in combinations(sorted(paths), 2):
            grouped += 1
            if photo.get(a) == photo.get(b):
                same += 1
            else:
                key = tuple(sorted((original.get(photo.get(a), a), original.get(photo.get(b), b))))
                wrong[key] = wrong.get(key, 0) + 1
    by_photo: dict[str, list[dict]] = {}
    for r in truth:
        by_photo.setdefault(r["photo"], []).append(r)
    found: dict[str, list[bool]] = {"mild": [], "heavy": [], "all": []}
    for rows in by_photo.values():
        for a, b in combinations(rows, 2):
            together = a["path"] in group_of and group_of.get(a["path"]) == group_of.get(b["path"])
            found["all"].append(together)
            kinds = {a["edit"], b["edit"]}
            if "original" in kinds and len(kinds) == 2:
                kind = (kinds - {"original"}).pop().split("-")[0]
                found[kind].append(together)
    return {
        "files": len(truth), "photos": len(by_photo), "pairs_grouped": grouped,
        "precision": round(same / grouped, 4) if grouped else 1.0,
        **{f"recall_{k}": round(float(np.mean(v)), 4) if v else None for k, v in found.items()},
        **{f"pairs_{k}": len(v) for k, v in found.items()},
        # Which two photos' files were grouped together, and how many pairs of files that made.
        "wrong": [{"photos": list(k), "pairs": n} for k, n in sorted(wrong.items(), key=lambda kv: -kv[1])],
    }
