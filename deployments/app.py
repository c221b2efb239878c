"""The two application builders serve_config.yaml imports.

- `deployments.app:build_index`: one index version: a Shard deployment per shard, bound under an
  Index entry that describes them (no HTTP route). Its name carries the version, so a new version
  deploys beside the old one (`python -m deployments switch`).
- `deployments.app:build_app`: the HTTP front: Ingress and Embedder. Its Ingress finds the index
  application by name from its user_config, which can change without a restart, and calls that
  application's shards directly.
"""
from __future__ import annotations

import os
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from configs.schema import index_model, load_config
from deployments.embedder import Embedder
from deployments.index import Index
from deployments.ingress import Ingress
from deployments.shard import Shard
from deployments.verifier import Verifier
from indexing.manifest import read_manifest


class AppArgs(BaseModel):
    """`args:` of either application in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")
    index_dir: str = Field(description="index directory (path or URI)")
    version: Optional[int] = Field(None, ge=1, description="manifest version to serve (index app); null = current")
    config: Optional[str] = Field(None, description="app config YAML (default: configs/default.yaml)")
    overrides: dict = Field(default_factory=dict, description="nested keys that override the config file")

    def load(self):
        """(config, absolute index dir, manifest)."""
        index_dir = self.index_dir if "://" in self.index_dir else os.path.abspath(self.index_dir)
        return load_config(self.config, self.overrides), index_dir, read_manifest(index_dir, self.version)


def build_index(args: dict) -> serve.Application:
    """Shard deployments of one manifest version under their Index entry."""
    cfg, index_dir, m = AppArgs.model_validate(args).load()
    names = [f"Shard{i:03d}" for i in range(m.num_shards)]
    shards = [
        Shard.options(
            name=name, num_replicas=cfg.serve.shard_replicas, max_replicas_per_node=cfg.serve.shard_max_replicas_per_node,
            ray_actor_options={"num_cpus": cfg.serve.shard_num_cpus, "resources": cfg.serve.shard_resources},
            max_ongoing_requests=cfg.serve.shard_max_ongoing, max_queued_requests=cfg.serve.shard_max_queued,
        ).bind(index_dir, m.model_dump(), i, cfg.serve.compact_after_bytes,
               cfg.serve.shard_max_ongoing + cfg.serve.shard_max_queued)
        for i, name in enumerate(names)
    ]
    info = {"version": m.version, "dim": m.dim, "metric": m.metric, "factory": m.factory, "nprobe": m.nprobe,
            "index_dir": index_dir, "slot_table": m.slot_table, "shards": names, "sources": m.sources,
            "placement": m.placement, "cell_table": m.cell_table, "template": m.template}
    return Index.bind(shards, info)


def build_app(args: dict) -> serve.Application:
    """The HTTP front: embedder (with the model that built the current index) and ingress."""
    cfg, _, m = AppArgs.model_validate(args).load()
    # The model that embedded the corpus (from the manifest), run where and how this service's
    # config says (device, runtime, batch).
    model_cfg = index_model(cfg.model, m.model)
    embedder = Embedder.bind(model_cfg, cfg.decode.model_dump(), cfg.serve.max_batch_size,
                             cfg.serve.batch_wait_timeout_s, cfg.serve.embedder_threads, cfg.serve.max_concurrent_decodes)
    # Tokens are not constructor arguments (the dashboard shows those): each replica reads them
    # itself (deployments/http.py load_tokens), from the config, its tokens_file and its environment.
    serve_cfg = cfg.serve.model_dump(exclude={"write_tokens", "read_tokens"})
    a = AppArgs.model_validate(args)
    verifier = Verifier.bind(cfg.decode.model_dump(), cfg.serve.verify_cache_bytes, cfg.serve.verify_threads)
    return Ingress.bind(embedder, verifier, serve_cfg, cfg.decode.model_dump(), {"config": a.config, "overrides": a.overrides})
