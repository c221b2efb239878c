"""Indexing: images per second of `python -m indexing build` end to end (a fresh process: Ray start,
Ray Data read + decode, actor-pool embedding, parquet, template training, shard tasks, catalog,
manifest), with the model in eager torch and in ONNX Runtime, against single-process loops that
decode, embed each image as the build does (the frame and its index views) and add to one FAISS
index. The eager-torch loop is the yardstick every ratio divides by."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np

LOG = logging.getLogger(__name__)


def sample_folder(images: str, out: str, n: int) -> list[str]:
    """Link the first `n` images of `images` (sorted) into `out`; returns their paths."""
    from indexing.storage import list_files

    files = [f for f, _ in list_files(images, (".jpg", ".jpeg", ".png"))][:n]
    os.makedirs(out, exist_ok=True)
    for i, f in enumerate(files):
        dst = os.path.join(out, f"{i:06d}{os.path.splitext(f)[1]}")
        if not os.path.exists(dst):
            os.symlink(os.path.abspath(f), dst)
    return files


def build_job(folder: str, index_dir: str, shards: int, runtime: str) -> dict:
    """`python -m indexing build` as a user runs it, timed from process start to exit."""
    config = os.path.join(os.path.dirname(index_dir), f"runtime-{runtime}.yaml")
    with open(config, "w") as f:
        f.write(f"model:\n  runtime: {runtime}\n")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "indexing", "build", "--images", folder, "--index-dir", index_dir,
                        "--shards", str(shards), "--config", config], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"indexing build failed: {p.stderr[-2000:]}")
    n = len(os.listdir(folder))
    return {"path": f"python -m indexing build ({shards} shards), {runtime}", "runtime": runtime, "images": n,
            "seconds": wall, "images_per_s": n / wall}


def single_process(files: list[str], factory: str, runtime: str, batch_size: int = 64) -> dict:
    """Decode + embed (with the index views) + one FAISS index with the same factory, in this process."""
    from configs.schema import ModelConfig
    from embedding.embedder import Embedder

    t0 = time.perf_counter()
    emb = Embedder(ModelConfig(runtime=runtime))
    x = np.concatenate([emb.embed_bytes([open(f, "rb").read() for f in files[s : s + batch_size]], for_index=True)
                        for s in range(0, len(files), batch_size)])
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    wall = time.perf_counter() - t0
    return {"path": f"single-process loop ({factory}), {runtime}", "runtime": runtime, "images": len(files),
            "seconds": wall, "images_per_s": len(files) / wall}


def bench_indexing(images: str, workdir: str, n: int, shards: int = 2) -> tuple[list[dict], str]:
    """Both paths on the same `n` images; returns the rows and the built index directory."""
    from indexing.manifest import read_manifest

    folder = os.path.join(workdir, f"images-{n}")
    files = sample_folder(images, folder, n)
    index_dir = os.path.join(workdir, f"index-images-{n}")
    rows = []
    for runtime in ("torch", "onnx"):  # the ONNX build last: its index is the one returned
        if os.path.exists(index_dir):
            shutil.rmtree(index_dir)
        rows.append(build_job(folder, index_dir, shards, runtime))
    factory = read_manifest(index_dir).factory
    rows += [single_process(files, factory, "torch"), single_process(files, factory, "onnx")]
    base = rows[2]["images_per_s"]
    for r in rows:
        r["vs_torch_loop"] = r["images_per_s"] / base
        LOG.info("%s: %.1f images/s", r["path"], r["images_per_s"])
    return rows, index_dir
