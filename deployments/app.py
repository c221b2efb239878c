"""The application builder that serve_config.yaml imports: `deployments.app:build_app`."""
from __future__ import annotations

import os
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from configs.schema import AppConfig, load_config
from deployments.embedder import Embedder
from deployments.ingress import Ingress
from deployments.ranker import Ranker
from deployments.router import Router
from deployments.shard import Shard
from indexing.manifest import read_manifest


class AppArgs(BaseModel):
    """`args:` of the application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")
    index_dir: str = Field(description="index directory (path or URI) whose current manifest is served")
    config: Optional[str] = Field(None, description="app config YAML (default: configs/default.yaml)")
    overrides: dict = Field(default_factory=dict, description="nested keys that override the config file")


def build_app(args: dict) -> serve.Application:
    """Shard deployments from the manifest, then router, embedder, ranker and the HTTP ingress."""
    a = AppArgs.model_validate(args)
    cfg: AppConfig = load_config(a.config, a.overrides)
    index_dir = a.index_dir if "://" in a.index_dir else os.path.abspath(a.index_dir)
    m = read_manifest(index_dir)
    model_cfg = m.model or cfg.model.model_dump()  # serve with the model that built the index
    shards = [
        Shard.options(
            name=f"Shard{i:03d}", num_replicas=cfg.serve.shard_replicas,
            ray_actor_options={"num_cpus": cfg.serve.shard_num_cpus},
        ).bind(index_dir, m.model_dump(), i, cfg.serve.compact_after_bytes)
        for i in range(m.num_shards)
    ]
    router = Router.bind(shards, m.metric, cfg.serve.shard_timeout_s)
    embedder = Embedder.bind(model_cfg, cfg.decode.model_dump(), cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)
    ranker = Ranker.bind(cfg.serve.near_duplicate_cosine)
    info = {"version": m.version, "dim": m.dim, "metric": m.metric, "factory": m.factory, "nprobe": m.nprobe,
            "index_dir": index_dir}
    return Ingress.bind(
        embedder, router, ranker, shards, m.slot_table, info, cfg.serve.model_dump(), cfg.decode.model_dump(),
        cfg.serve.write_tokens + _env_list("IMSEARCH_WRITE_TOKENS"), cfg.serve.read_tokens + _env_list("IMSEARCH_READ_TOKENS"),
    )


def _env_list(name: str) -> list[str]:
    """Comma-separated tokens from the environment of the process that builds the app."""
    return [t.strip() for t in os.environ.get(name, "").split(",") if t.strip()]
