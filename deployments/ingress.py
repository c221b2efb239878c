"""Ingress deployment: the HTTP API. Validates and bounds every request, then composes the
embedder, the index application's router and the ranker.

Which index application it calls, and whether writes are paused, is its user_config: a version
switch changes both in place, with no restart and no request refused."""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from configs.schema import DecodeConfig, ServeConfig
from deployments.http import (
    ApiError, check_token, parse_bool, parse_flags, parse_image_id, parse_k, parse_nprobe, parse_vector_request, read_body,
    read_image,
)
from pydantic import BaseModel, ConfigDict, Field

LOG = logging.getLogger("ray.serve")


class Routing(BaseModel):
    """The Ingress user_config."""

    model_config = ConfigDict(extra="forbid")
    index_app: str = Field(min_length=1, description="name of the Serve application serving the index version")
    writes_paused: bool = Field(False, description="answer writes with 503 + Retry-After (during a version switch)")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class Ingress:
    def __init__(
        self, embedder: DeploymentHandle, ranker: DeploymentHandle, serve_cfg: dict, decode_cfg: dict,
        write_tokens: list[str], read_tokens: list[str],
    ):
        self.embedder, self.ranker = embedder, ranker
        self.routing: Routing | None = None  # set by reconfigure (user_config) before any request
        self.infos: dict[str, dict] = {}
        self.writes_in_flight = 0
        self.cfg, self.decode = ServeConfig(**serve_cfg), DecodeConfig(**decode_cfg)
        self.write_tokens = frozenset(write_tokens)
        self.read_tokens = frozenset(read_tokens) | self.write_tokens if read_tokens else None
        self.routes = [
            Route("/images/{id}", self.image, methods=["GET", "PUT", "DELETE", "PATCH"]),
            Route("/search", self.search_image, methods=["POST"]),
            Route("/search/vector", self.search_vector, methods=["POST"]),
            Route("/embed", self.embed, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/stats", self.stats, methods=["GET"]),
        ]

    def reconfigure(self, config: dict) -> None:
        """Point at an index application (and pause or resume writes); requests already running
        finish on the application they started with."""
        routing = Routing.model_validate(config)
        self.router = serve.get_deployment_handle("Router", app_name=routing.index_app, _check_exists=False)
        self.routing = routing
        LOG.info("serving index application %s (writes %s)", routing.index_app,
                 "paused" if routing.writes_paused else "open")

    def current_routing(self) -> dict:
        """The applied user_config and the writes still in flight, so a switch can tell when every
        replica has taken a change."""
        return {**self.routing.model_dump(), "writes_in_flight": self.writes_in_flight}

    async def _index_info(self) -> dict:
        """The served index's info, fetched once per index application."""
        app, router = self.routing.index_app, self.router
        if app not in self.infos:
            self.infos = {app: await router.info.remote()}
        return self.infos[app]

    async def __call__(self, request: Request) -> Response:
        """Dispatch with Starlette's own route matching; every failure becomes a JSON error."""
        try:
            if self.routing is None:
                raise ApiError(503, "not_configured", "the Ingress has no user_config naming its index application")
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

    def _authorize_read(self, request: Request) -> None:
        if self.read_tokens is not None:
            check_token(request, self.read_tokens, what="searches")

    def _authorize_write(self, request: Request) -> None:
        if not self.write_tokens:
            raise ApiError(403, "writes_disabled", "no write tokens are configured: this service is read-only")
        check_token(request, self.write_tokens, what="writes")

    async def _write(self, *args) -> bool:
        """Send a write to the served index unless writes are paused. The in-flight count rises
        before the pause check, so once a switch sees writes paused and none in flight, none can
        still reach the old version."""
        self.writes_in_flight += 1
        try:
            if self.routing.writes_paused:
                raise ApiError(503, "writes_paused", "the index is switching versions; retry in a few seconds",
                               headers={"Retry-After": "5"})
            return await self.router.write.remote(*args)
        finally:
            self.writes_in_flight -= 1

    async def _search(self, queries: np.ndarray, k: int, nprobe, exclude_sha256=None, dedupe=True):
        """Router then ranker: (results per query, partial)."""
        fetch = k * self.cfg.dedupe_fetch_factor if dedupe or exclude_sha256 else k
        with_vectors = dedupe and self.cfg.near_duplicate_cosine is not None
        hits = await self.router.search.remote(queries, fetch, nprobe, with_vectors)
        if "unavailable" in hits:
            raise ApiError(503, "shards_unavailable", hits["unavailable"])
        results = await self.ranker.rank.remote(hits, k, exclude_sha256, dedupe)
        return results, hits["partial"]

    async def _embed_upload(self, request: Request) -> tuple[np.ndarray, bytes]:
        data = await read_image(request, self.decode.max_bytes)
        emb = await self.embedder.embed_image.remote(data)
        if "error" in emb:
            raise ApiError(413 if emb["error"] == "image_too_large" else 400, emb["error"], emb["message"])
        dim = (await self._index_info())["dim"]
        if len(emb["vector"]) != dim:
            raise ApiError(503, "model_mismatch", f"the embedder gives dimension {len(emb['vector'])}, "
                           f"the index holds {dim}: this index only answers /search/vector")
        return emb["vector"], data

    async def search_image(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._authorize_read(request)
        k = parse_k(request.query_params.get("k"), self.cfg.default_k, self.cfg.max_k)
        nprobe = parse_nprobe(request.query_params.get("nprobe"))
        exclude_self = parse_bool(request.query_params.get("exclude_self"), self.cfg.exclude_query_image, "exclude_self")
        dedupe = parse_bool(request.query_params.get("dedupe"), True, "dedupe")
        vector, data = await self._embed_upload(request)
        own = hashlib.sha256(data).hexdigest() if exclude_self else None
        results, partial = await self._search(vector[None, :], k, nprobe, own, dedupe)
        return JSONResponse({"results": results[0], "partial": partial, "took_ms": _ms(t0)})

    async def embed(self, request: Request) -> Response:
        """The query vector of an uploaded image, for clients that keep their own vectors."""
        t0 = time.perf_counter()
        self._authorize_read(request)
        vector, _ = await self._embed_upload(request)
        return JSONResponse({"vector": vector.tolist(), "dim": len(vector), "took_ms": _ms(t0)})

    async def search_vector(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._authorize_read(request)
        body = await read_body(request, self.decode.max_bytes)
        dim = (await self._index_info())["dim"]
        x, batched, obj = parse_vector_request(body, dim, self.cfg.max_vectors_per_request)
        k = parse_k(obj.get("k", request.query_params.get("k")), self.cfg.default_k, self.cfg.max_k)
        nprobe = parse_nprobe(obj.get("nprobe", request.query_params.get("nprobe")))
        dedupe = parse_bool(obj.get("dedupe", request.query_params.get("dedupe")), True, "dedupe")
        results, partial = await self._search(x, k, nprobe, None, dedupe)
        return JSONResponse({"results": results if batched else results[0], "partial": partial, "took_ms": _ms(t0)})

    async def image(self, request: Request) -> Response:
        """GET (metadata), PUT (add or replace), DELETE and PATCH (flags) of one image id."""
        id_ = parse_image_id(request.path_params["id"])
        if request.method == "GET":
            self._authorize_read(request)
            meta = await self.router.get.remote(id_)
            if meta is None:
                raise ApiError(404, "not_found", f"no image {id_}")
            return JSONResponse(meta)
        self._authorize_write(request)
        if request.method == "PUT":
            vector, data = await self._embed_upload(request)
            uri = request.query_params.get("uri", "")
            existed = await self._write("upsert", id_, vector, uri, hashlib.sha256(data).hexdigest())
            return JSONResponse({"id": id_, "created": not existed}, status_code=200 if existed else 201)
        if request.method == "DELETE":
            if not await self._write("delete", id_):
                raise ApiError(404, "not_found", f"no image {id_}")
            return JSONResponse({"id": id_, "deleted": True})
        flags = parse_flags(await read_body(request, 4096))
        if not await self._write("flags", id_, None, "", "", flags.get("private"), flags.get("unsafe")):
            raise ApiError(404, "not_found", f"no image {id_}")
        return JSONResponse({"id": id_, **flags})

    async def healthz(self, request: Request) -> Response:
        infos = await self.router.shard_info.remote()
        down = [i for i, s in enumerate(infos) if s is None]
        status = 503 if down else 200
        return JSONResponse({"status": "unavailable" if down else "ok", "shards_down": down}, status_code=status)

    async def stats(self, request: Request) -> Response:
        infos = await self.router.shard_info.remote()
        total = sum(s["count"] for s in infos) if all(infos) else None
        keys = ("count", "generation", "log_bytes", "rss_bytes", "load_rss_bytes")
        shards = [{"shard": i, "loaded": s is not None, **{k: (s or {}).get(k) for k in keys}} for i, s in enumerate(infos)]
        return JSONResponse({**await self._index_info(), "index_app": self.routing.index_app,
                             "writes_paused": self.routing.writes_paused, "total": total, "shards": shards})


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)
