"""The training job's sources: images under a folder, their labels (CSV) and click pairs (JSONL),
read and checked without torch or Ray, so that `python -m training train` refuses a bad input in a
second, before either starts."""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import Optional

from configs.schema import AppConfig


class TrainError(ValueError):
    """Training inputs that cannot be used; the message names the file and the problem."""


@dataclass
class TrainData:
    """Training images (paths under root), their positive groups, and the held-out images."""

    root: str
    paths: list[str]
    categories: Optional[list[int]] = None
    pairs: list[tuple[int, int]] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    heldout_categories: Optional[list[str]] = None
    category_names: list[str] = field(default_factory=list)  # categories[i] indexes this list


def load_sources(images: str, labels_csv: Optional[str], pairs_jsonl: Optional[str], cfg: AppConfig) -> TrainData:
    """Read the sources and split off the held-out images (per category when labelled)."""
    from indexing.storage import list_files

    t, rng = cfg.train, random.Random(cfg.train.seed)
    if not os.path.isdir(images):
        raise TrainError(f"--images {images}: not a folder")
    if labels_csv:
        rows = _read_labels(labels_csv, images)
        by_cat: dict[str, list[str]] = {}
        for p, c in rows:
            by_cat.setdefault(c, []).append(p)
        train, held = [], []
        for c in sorted(by_cat):
            ps = sorted(by_cat[c])
            rng.shuffle(ps)
            n_held = int(round(len(ps) * t.holdout))
            held += [(p, c) for p in ps[:n_held]]
            train += [(p, c) for p in ps[n_held:]]
        names = sorted(by_cat)
        data = TrainData(images, [p for p, _ in train], [names.index(c) for _, c in train],
                         heldout=[p for p, _ in held], heldout_categories=[c for _, c in held], category_names=names)
    else:
        files = [rel for _, rel in list_files(images, cfg.build.extensions)]
        rng.shuffle(files)
        n_held = int(round(len(files) * t.holdout))
        data = TrainData(images, files[n_held:], heldout=files[:n_held])
    if pairs_jsonl:
        index = {p: i for i, p in enumerate(data.paths)}
        for q, c in _read_pairs(pairs_jsonl, images):
            for p in (q, c):
                if p not in index:
                    index[p] = len(data.paths)
                    data.paths.append(p)
                    if data.categories is not None:
                        data.categories.append(-1 - len(data.paths))  # a category of its own
            data.pairs.append((index[q], index[c]))
    if len(data.paths) < 2:
        raise TrainError(f"need at least 2 training images, found {len(data.paths)} under {images}")
    return data


def _read_labels(path: str, root: str) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except OSError as e:
        raise TrainError(f"--labels {path}: {e.strerror}") from None
    rows = rows[1:] if rows and rows[0][:2] == ["path", "category"] else rows
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 or not os.path.isfile(os.path.join(root, r[0]))]
    if bad:
        raise TrainError(f"--labels {path}: rows {bad[:5]} need path,category with the path a file under {root}")
    return [(r[0], r[1]) for r in rows]


def _read_pairs(path: str, root: str) -> list[tuple[str, str]]:
    out = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    q, c = obj["query"], obj["clicked"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise TrainError(f"--pairs {path} line {n}: expected {{\"query\": path, \"clicked\": path}}") from None
                for p in (q, c):
                    if not os.path.isfile(os.path.join(root, p)):
                        raise TrainError(f"--pairs {path} line {n}: {p} is not a file under {root}")
                out.append((q, c))
    except OSError as e:
        raise TrainError(f"--pairs {path}: {e.strerror}") from None
    return out
