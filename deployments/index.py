"""Index deployment: the entry of one index version (a Serve application with no HTTP route).

It holds no data and sits on no query path: it binds the version's Shard deployments into one
application and tells the Ingress what it serves (dimension, metric, placement: slot or cell
table, shard names), so the Ingress can call the shards directly (`deployments.pipeline.Router`)."""
from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle


@serve.deployment(ray_actor_options={"num_cpus": 0.02}, max_ongoing_requests=64, max_queued_requests=256)
class Index:
    def __init__(self, shards: list[DeploymentHandle], index_info: dict):
        # The handles are kept only so that Serve deploys the shards as part of this application.
        self._shards, self.index_info = shards, index_info

    def info(self) -> dict:
        """Version, dimension, metric, factory, nprobe, directory, placement (slot table, cell table,
        template), sources and shard deployment names."""
        return self.index_info
