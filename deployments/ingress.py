"""Ingress deployment: the HTTP API. Validates and bounds every request, then composes the
embedder, router and ranker handles."""
from __future__ import annotations

import logging
import time

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from configs.schema import DecodeConfig, ServeConfig
from deployments.http import ApiError, parse_k, parse_nprobe, parse_vector_request, read_body, read_image

LOG = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class Ingress:
    def __init__(
        self, embedder: DeploymentHandle, router: DeploymentHandle, ranker: DeploymentHandle,
        index_info: dict, serve_cfg: dict, decode_cfg: dict,
    ):
        self.embedder, self.router, self.ranker = embedder, router, ranker
        self.info = index_info
        self.cfg, self.decode = ServeConfig(**serve_cfg), DecodeConfig(**decode_cfg)
        self.routes = [
            Route("/search", self.search_image, methods=["POST"]),
            Route("/search/vector", self.search_vector, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/stats", self.stats, methods=["GET"]),
        ]

    async def __call__(self, request: Request) -> Response:
        """Dispatch with Starlette's own route matching; every failure becomes a JSON error."""
        try:
            partial = None
            for route in self.routes:
                match, child = route.matches(request.scope)
                if match == Match.FULL:
                    request.scope.update(child)
                    return await route.endpoint(request)
                partial = partial or (route if match == Match.PARTIAL else None)
            if partial is not None:
                raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
            raise ApiError(404, "not_found", f"no route {request.url.path}")
        except ApiError as e:
            return e.response()
        except Exception:
            LOG.exception("internal error on %s", request.url.path)
            return ApiError(500, "internal", "internal error; see the service logs").response()

    async def _search(self, queries: np.ndarray, k: int, nprobe) -> tuple[list[list[dict]], bool]:
        fetch = min(k * self.cfg.dedupe_fetch_factor, self.cfg.max_k * self.cfg.dedupe_fetch_factor)
        hits = await self.router.search.remote(queries, fetch, nprobe)
        if "unavailable" in hits:
            raise ApiError(503, "shards_unavailable", hits["unavailable"])
        results = await self.ranker.rank.remote(hits["scores"], hits["ids"], k)
        return results, hits["partial"]

    async def search_image(self, request: Request) -> Response:
        t0 = time.perf_counter()
        k = parse_k(request.query_params.get("k"), self.cfg.default_k, self.cfg.max_k)
        nprobe = parse_nprobe(request.query_params.get("nprobe"))
        data = await read_image(request, self.decode.max_bytes)
        emb = await self.embedder.embed_image.remote(data)
        if "error" in emb:
            status = 413 if emb["error"] == "image_too_large" else 400
            raise ApiError(status, emb["error"], emb["message"])
        if len(emb["vector"]) != self.info["dim"]:
            raise ApiError(503, "model_mismatch", f"the embedder gives dimension {len(emb['vector'])}, "
                           f"the index holds {self.info['dim']}: this index only answers /search/vector")
        results, partial = await self._search(emb["vector"][None, :], k, nprobe)
        return JSONResponse({"results": results[0], "partial": partial, "took_ms": _ms(t0)})

    async def search_vector(self, request: Request) -> Response:
        t0 = time.perf_counter()
        body = await read_body(request, self.decode.max_bytes)
        x, batched, obj = parse_vector_request(body, self.info["dim"], self.cfg.max_vectors_per_request)
        k = parse_k(obj.get("k", request.query_params.get("k")), self.cfg.default_k, self.cfg.max_k)
        nprobe = parse_nprobe(obj.get("nprobe", request.query_params.get("nprobe")))
        results, partial = await self._search(x, k, nprobe)
        return JSONResponse({"results": results if batched else results[0], "partial": partial, "took_ms": _ms(t0)})

    async def healthz(self, request: Request) -> Response:
        infos = await self.router.shard_info.remote()
        down = [i for i, s in enumerate(infos) if s is None]
        status = 503 if down else 200
        return JSONResponse({"status": "unavailable" if down else "ok", "shards_down": down}, status_code=status)

    async def stats(self, request: Request) -> Response:
        infos = await self.router.shard_info.remote()
        shards = [{"shard": i, "loaded": s is not None, "count": (s or {}).get("count")} for i, s in enumerate(infos)]
        return JSONResponse({**self.info, "shards": shards})


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)
