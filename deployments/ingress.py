"""Ingress deployment: the HTTP API. Validates and bounds every request, then runs the query
pipeline (deployments/pipeline.py) in its own process: the embedder and the shards are the only
other deployments a request reaches, so a vector query crosses one hop (Ingress -> every shard
in parallel) and back.

Which index application it calls, and whether writes are paused, is its user_config: a version
switch changes both in place, with no restart and no request refused."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import logging.handlers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from configs.schema import DecodeConfig, ServeConfig
from deployments.http import (
    ApiError, JSONResponse, bearer_token, check_token, load_tokens, parse_bool, parse_flags, parse_image_id, parse_k, parse_nprobe,
    parse_size, parse_uri, parse_vector_request, read_body, read_image, token_in, vector_body_limit,
)
from deployments import environment, openapi, thumbnails
from deployments.metrics import DECODE_EMBED, FANOUT, MERGE_RANK, VERIFY, IngressMetrics
from deployments.pipeline import (
    KeyedLocks, Overloaded, Query, Router, ShardsUnavailable, once_more, rank, run_batch, within,
)
from deployments.wire import ShardLink, ShardOverloaded
from indexing.catalog import sha_key
from indexing.cache import BytesLRU
from indexing.cells import CellRouting
from indexing.ids import derived_id
from indexing.idlocks import id_lock
from indexing.live import SealedError
from indexing.policy import fetch_size, verification_shortlist, verified_first

LOG = logging.getLogger("ray.serve")
# Routes that stay open when the Ingress is at its in-flight limit: operators need them most then.
UNLIMITED = ("/healthz", "/stats")
# Serve's throughput mode buffers request-path log lines (1,000 of them) and writes them only when
# the buffer fills: an operator tailing the log of a quiet service saw nothing. Flushed this often.
ACCESS_LOG_FLUSH_S = 1.0
# The web page (plain files, no build step) and what each asset is served as.
WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Thumbnails are revalidated after this long, so an image flagged private stops showing soon.
THUMBNAIL_MAX_AGE_S = 300


class Routing(BaseModel):
    """The Ingress user_config."""

    model_config = ConfigDict(extra="forbid")
    index_app: str = Field(min_length=1, description="name of the Serve application serving the index version")
    writes_paused: bool = Field(False, description="answer writes with 503 + Retry-After (during a version switch)")
    uri_roots: list[str] = Field([], description="folders an operator allowed while the service runs "
                                 "(`python -m deployments allow`), besides serve.uri_roots")


@dataclass
class IndexVersion:
    """What the Ingress holds of one index application: its info, shard handles and Router."""

    app: str
    info: dict
    shards: list[DeploymentHandle]
    router: Router

    async def holders(self, id_: int, timeout_s: float) -> list[tuple[int, dict]]:
        """(shard, metadata) of every shard holding an id: one at most under hash placement (one
        shard is asked); under cell placement all are asked (a membership check each)."""
        candidates = self.router.shards_for_id(id_)
        unavailable = ApiError(503, "shards_unavailable", f"the shard holding image {id_} did not answer",
                               headers={"Retry-After": "2"})
        answers = await asyncio.gather(*[_bounded(lambda s=s: self.shards[s].get.remote(id_), timeout_s, unavailable)
                                         for s in candidates])
        return [(s, meta) for s, meta in zip(candidates, answers) if meta is not None]

    async def lookup(self, id_: int, timeout_s: float) -> tuple[Optional[int], Optional[dict]]:
        """The shard holding an id and the id's metadata (a flag set on any copy counts); (None,
        None) when no shard has it."""
        found = await self.holders(id_, timeout_s)
        if not found:
            return None, None
        meta = dict(found[0][1])
        for flag in ("private", "unsafe"):
            meta[flag] = any(m[flag] for _, m in found)
        return found[0][0], meta


def overloaded(what: str) -> ApiError:
    return ApiError(503, "overloaded", f"{what} is at its queue limit; retry shortly", headers={"Retry-After": "1"})


async def _bounded(call, timeout_s: float, on_timeout: ApiError, *, keep_running: bool = False):
    """`call()` (a handle call) bounded in time, made once more if a replica died under it
    (pipeline.once_more), its failures turned into API errors."""
    try:
        return await once_more(call, timeout_s, lambda e: isinstance(e, RayActorError), keep_running=keep_running)
    except asyncio.TimeoutError:
        raise on_timeout from None
    except BackPressureError:
        raise overloaded("the service") from None
    except RayActorError:
        raise ApiError(on_timeout.status, on_timeout.code, on_timeout.message + " (a replica was lost; retry)",
                       headers=on_timeout.headers) from None


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512, max_queued_requests=512)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, verifier: DeploymentHandle, serve_cfg: dict, decode_cfg: dict,
                 config_source: dict):
        self.embedder, self.verifier = embedder, verifier
        self.routing: Routing | None = None  # set by reconfigure (user_config) before any request
        self.version: Optional[IndexVersion] = None
        self.in_flight = self.writes_in_flight = 0
        self.searching = 0  # fan-outs on their way to the shards (a lone query skips the batch queue)
        self.id_locks = KeyedLocks()
        self._log_flusher: Optional[asyncio.Task] = None
        self.cfg, self.decode = ServeConfig(**serve_cfg), DecodeConfig(**decode_cfg)
        self._search_batch.set_max_batch_size(self.cfg.search_batch_size)
        self._search_batch.set_batch_wait_timeout_s(self.cfg.search_batch_wait_s)
        write_tokens, read_tokens = load_tokens(config_source["config"], config_source["overrides"])
        self.write_tokens = frozenset(write_tokens)
        self.read_tokens = frozenset(read_tokens) | self.write_tokens if read_tokens else None
        self.metrics = IngressMetrics()
        # Keyed by uri, sha256 and size: a replaced image never answers with its old thumbnail.
        self.thumbnails = BytesLRU(self.cfg.thumbnail_cache_bytes, size=len)
        self.thumbnail_slots = asyncio.Semaphore(self.cfg.max_concurrent_thumbnails)
        self.page_html = _page(self.cfg, needs_token=self.read_tokens is not None)
        self.fast_paths_off = environment.off()
        if self.fast_paths_off:
            LOG.warning("Serve fast paths off in this cluster (%s): Ray was started without them, and requests cost "
                        "about twice the CPU. Start it with `python -m deployments run`, or run "
                        "`eval \"$(python -m deployments env)\"` before `serve run` / `ray start`",
                        ", ".join(self.fast_paths_off))
        self.routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/ui/{name}", self.asset, methods=["GET"]),
            Route("/images/{id}/thumbnail", self.thumbnail, methods=["GET"]),
            Route("/images", self.add_image, methods=["POST"]),
            Route("/images/{id}", self.image, methods=["GET", "PUT", "DELETE", "PATCH"]),
            Route("/search", self.search_image, methods=["POST"]),
            Route("/search/vector", self.search_vector, methods=["POST"]),
            Route("/embed", self.embed, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/stats", self.stats, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]

    def reconfigure(self, config: dict) -> None:
        """Point at an index application (and pause or resume writes); requests already running
        finish on the application they started with."""
        self.routing = Routing.model_validate(config)
        LOG.info("serving index application %s (writes %s)", self.routing.index_app,
                 "disabled: no write token" if not self.write_tokens
                 else "paused" if self.routing.writes_paused else "open to write-token holders")

    def current_routing(self) -> dict:
        """The applied user_config and the writes still in flight, so a switch can tell when every
        replica has taken a change."""
        return {**self.routing.model_dump(), "writes_in_flight": self.writes_in_flight}

    async def _index(self) -> IndexVersion:
        """The index version the user_config names, resolved once per application: its Index
        deployment says which shard deployments to call."""
        app = self.routing.index_app
        if self.version is None or self.version.app != app:
            entry = serve.get_deployment_handle("Index", app_name=app, _check_exists=False)
            info = await _bounded(entry.info.remote, self.cfg.shard_timeout_s * 5,
                                  ApiError(503, "index_unavailable", f"index application {app} does not answer"))
            shards = [serve.get_deployment_handle(name, app_name=app, _check_exists=False) for name in info["shards"]]
            searches = [lambda q, k, p, h=h: h.search.remote(q, k, p) for h in shards]
            if self.cfg.shard_direct:  # over each replica's own port; the handle when that fails
                links = [ShardLink(h.endpoint.remote, search) for h, search in zip(shards, searches)]
                searches = [link.search for link in links]
            cells = None
            if info.get("placement") == "cells":  # the coarse quantizer only: centroids, no codes
                cells = await asyncio.to_thread(CellRouting.open, info["index_dir"], info["template"],
                                                info["cell_table"], info["nprobe"])
            router = Router(searches, info["slot_table"], info["metric"], self.cfg.shard_timeout_s,
                            is_overload=lambda e: isinstance(e, (BackPressureError, ShardOverloaded)),
                            on_fanout=lambda seconds: self.metrics.stage(FANOUT, seconds), cells=cells)
            self.version = IndexVersion(app, info, shards, router)  # a request keeps the version it started on
        return self.version

    async def __call__(self, request: Request) -> Response:
        """Dispatch with Starlette's own route matching; every failure becomes a JSON error. Logs one
        access line per request with the route template (`/images/{id}`), never the raw path."""
        t0 = time.perf_counter()
        response = await self._answer(request)
        seconds, route = time.perf_counter() - t0, request.scope.get("route_template", "(no route)")
        LOG.info("%s %s %d %.1fms", request.method, route, response.status_code, seconds * 1000.0)
        self.metrics.request(route, request.method, response.status_code, seconds)
        if self._log_flusher is None:
            self._log_flusher = asyncio.create_task(_flush_logs_every(ACCESS_LOG_FLUSH_S))
        return response

    async def _answer(self, request: Request) -> Response:
        limited = request.url.path not in UNLIMITED
        try:
            endpoint = self._route(request)
            if limited and self.in_flight >= self.cfg.max_in_flight:
                raise overloaded("the service")
            self.in_flight += limited
            try:
                return await endpoint(request)
            finally:
                self.in_flight -= limited
        except ApiError as e:
            if e.code == "overloaded":
                self.metrics.overloads.inc(1, tags={"route": request.scope.get("route_template", "(no route)")})
            return e.response()
        except Exception:
            LOG.exception("internal error on %s", request.scope.get("route_template", "(no route)"))
            return ApiError(500, "internal", "internal error; see the service logs").response()

    def _route(self, request: Request):
        """The endpoint of a request (its route template goes into the scope), else 404 or 405."""
        if self.routing is None:
            raise ApiError(503, "not_configured", "the Ingress has no user_config naming its index application")
        partial = None
        for route in self.routes:
            match, child = route.matches(request.scope)
            if match == Match.FULL:
                request.scope.update(child, route_template=route.path)
                return route.endpoint
            partial = partial or (route if match == Match.PARTIAL else None)
        if partial is not None:
            raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
        raise ApiError(404, "not_found", f"no route {request.url.path}")

    def _authorize_read(self, request: Request) -> None:
        if self.read_tokens is not None:
            check_token(request, self.read_tokens, what="searches")

    def _is_writer(self, request: Request) -> bool:
        return token_in(bearer_token(request), self.write_tokens)

    def _authorize_write(self, request: Request) -> None:
        if not self.write_tokens:
            raise ApiError(403, "writes_disabled", "no write tokens are configured, so this service is read-only: "
                           "start it with IMSEARCH_WRITE_TOKENS=<token> in its environment (e.g. "
                           "`IMSEARCH_WRITE_TOKENS=s3cret make run`), or set serve.write_tokens or serve.tokens_file")
        check_token(request, self.write_tokens, what="writes")

    # ------------------------------------------------------------------ search

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _search_batch(self, queries: list[Query]) -> list:
        """Concurrent queries travel to each shard as one matrix (pipeline.run_batch)."""
        return await self._fan_out(queries)

    async def _fan_out(self, queries: list[Query]) -> list:
        """pipeline.run_batch, counted in `searching` while it runs."""
        self.searching += 1
        try:
            return await run_batch(queries)
        finally:
            self.searching -= 1

    async def _search(self, queries: np.ndarray, k: int, nprobe, query_sha256=None, exclude_query=False, dedupe=True):
        """Batch, fan out, merge, rank: (results per query, copies collapsed per query, partial,
        id -> (uri, sha256 prefix, perceptual hash) of the hits). `query_sha256` (an image search's
        own bytes) puts the indexed image first, or leaves it out with `exclude_query`."""
        if len(queries) * k > self.cfg.max_hits_per_request:
            raise ApiError(422, "too_much_work", f"{len(queries)} queries x k={k} asks for {len(queries) * k} "
                           f"results; the limit per request is {self.cfg.max_hits_per_request}")
        version = await self._index()
        fetch = fetch_size(k, self.cfg.dedupe_fetch_factor, dedupe, exclude_query)
        query = Query(queries, fetch, nprobe, version.router)
        if self.searching:  # others are on their way to the shards: join the next batch
            hits = await self._search_batch(query)
        else:  # alone: straight to the shards, without the batch queue's hops
            hits = (await self._fan_out([query]))[0]
        if isinstance(hits, Overloaded):
            raise overloaded("every shard")
        if isinstance(hits, ShardsUnavailable):
            raise ApiError(503, "shards_unavailable", str(hits), headers={"Retry-After": "2"})
        if isinstance(hits, Exception):
            raise hits
        t0 = time.perf_counter()
        results, collapsed = rank(hits, k, copy_bits=self.cfg.near_duplicate_bits, query_sha256=query_sha256,
                                  exclude_query=exclude_query, dedupe=dedupe)
        self.metrics.stage(MERGE_RANK, hits.merge_s + time.perf_counter() - t0)
        if hits.partial:
            self.metrics.partial.inc(1)
        return results, collapsed, hits.partial, hits.meta

    async def _embed_upload(self, request: Request, for_index: bool = False) -> tuple[np.ndarray, bytes, int]:
        data = await read_image(request, self.decode.max_bytes)
        t0 = time.perf_counter()
        emb = await _bounded(lambda: self.embedder.embed_image.remote(data, for_index), self.cfg.embed_timeout_s,
                             ApiError(503, "embedder_timeout", f"the image was not embedded within "
                                      f"{self.cfg.embed_timeout_s} s; retry shortly", headers={"Retry-After": "2"}))
        self.metrics.stage(DECODE_EMBED, time.perf_counter() - t0)
        if "error" in emb:
            raise ApiError(413 if emb["error"] == "image_too_large" else 400, emb["error"], emb["message"])
        dim = (await self._index()).info["dim"]
        if len(emb["vector"]) != dim:
            raise ApiError(503, "model_mismatch", f"the embedder gives dimension {len(emb['vector'])}, "
                           f"the index holds {dim}: this index only answers /search/vector")
        return emb["vector"], data, emb["phash"]

    def _nprobe(self, raw) -> Optional[int]:
        return parse_nprobe(raw, self.cfg.max_nprobe)

    async def search_image(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._authorize_read(request)
        q = request.query_params
        k = parse_k(q.get("k"), self.cfg.default_k, self.cfg.max_k)
        nprobe = self._nprobe(q.get("nprobe"))
        exclude_self = parse_bool(q.get("exclude_self"), self.cfg.exclude_query_image, "exclude_self")
        dedupe = parse_bool(q.get("dedupe"), True, "dedupe")
        verify = parse_bool(q.get("verify"), self.cfg.verify_default, "verify") and self.cfg.verify_top > 0
        vector, data, _ = await self._embed_upload(request)
        own = sha_key(hashlib.sha256(data).hexdigest())
        depth = max(k, self.cfg.verify_top) if verify else k
        results, collapsed, partial, meta = await self._search(vector[None, :], depth, nprobe, own, exclude_self,
                                                               dedupe)
        ranked, verified = results[0], False
        if verify and ranked:
            ranked, verified = await self._verified(data, own, ranked, meta)
        return JSONResponse({"results": ranked[:k], "collapsed": collapsed[0], "partial": partial,
                             "verified": verified, "took_ms": _ms(t0)})

    async def _verified(self, data: bytes, own: int, ranked: list[dict], meta: dict) -> tuple[list[dict], bool]:
        """The results with those the Verifier finds to be copies of the query first, after the
        query's own bytes where indexed (those need no verifying: an image with few keypoints
        would not verify against itself); the order as it was (and False) when it does not
        answer within serve.verify_timeout_s."""
        exact, ranked, candidates = verification_shortlist(ranked, meta, own, self.cfg.verify_top)
        roots = await self._readable_roots()
        t0 = time.perf_counter()
        try:
            # The Verifier stops itself a little before the deadline, so its partial answer arrives.
            found = await within(self.verifier.verify.remote(data, candidates, roots, self.cfg.verify_timeout_s * 0.8),
                                 self.cfg.verify_timeout_s)
        except (asyncio.TimeoutError, RayActorError, BackPressureError):
            LOG.warning("verification did not answer in time; unverified order returned")
            return exact + ranked, False
        self.metrics.stage(VERIFY, time.perf_counter() - t0)
        return exact + verified_first(ranked, found, self.cfg.verify_min_inliers), True

    async def embed(self, request: Request) -> Response:
        """The query vector of an uploaded image (?index=true: the vector an index holds for it),
        for clients that keep their own vectors."""
        t0 = time.perf_counter()
        self._authorize_read(request)
        for_index = parse_bool(request.query_params.get("index"), False, "index")
        vector, _, _ = await self._embed_upload(request, for_index)
        return JSONResponse({"vector": vector, "dim": len(vector), "took_ms": _ms(t0)})

    async def search_vector(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._authorize_read(request)
        dim = (await self._index()).info["dim"]
        ctype = request.headers.get("content-type", "")
        body = await read_body(request, vector_body_limit(ctype, dim, self.cfg.max_vectors_per_request))
        parse = (parse_vector_request, body, ctype, dim, self.cfg.max_vectors_per_request)
        # A large body parses in a thread: the event loop keeps serving the other requests meanwhile.
        x, batched, obj = await asyncio.to_thread(*parse) if len(body) > 65536 else parse[0](*parse[1:])
        q = request.query_params
        k = parse_k(obj.get("k", q.get("k")), self.cfg.default_k, self.cfg.max_k)
        nprobe = self._nprobe(obj.get("nprobe", q.get("nprobe")))
        dedupe = parse_bool(obj.get("dedupe", q.get("dedupe")), True, "dedupe")
        results, collapsed, partial, _ = await self._search(x, k, nprobe, dedupe=dedupe)
        if not batched:
            results, collapsed = results[0], collapsed[0]
        return JSONResponse({"results": results, "collapsed": collapsed, "partial": partial, "took_ms": _ms(t0)})

    # ------------------------------------------------------------------ writes and lookups

    async def _write(self, op: str, id_: int, *args, vector: Optional[np.ndarray] = None) -> bool:
        """Send a write to the shard that holds the id (an upsert: the shard its placement gives
        the id and `vector`) unless writes are paused; returns whether the id existed. Under cell
        placement an upsert whose new vector lies in another shard's cell also deletes the old
        copy, so an id lives on one shard. The in-flight count rises before the pause check, so
        once a switch sees writes paused and none in flight, none can still reach the old version.
        A write not acknowledged in time answers 503 with its outcome unknown; the call keeps
        running, so it is never reported failed after being logged."""
        self.writes_in_flight += 1
        try:
            if self.routing.writes_paused:
                raise ApiError(503, "writes_paused", "the index is switching versions; retry in a few seconds",
                               headers={"Retry-After": "5"})
            version = await self._index()
            unknown = ApiError(503, "write_outcome_unknown",
                               f"the write to image {id_} was not acknowledged within {self.cfg.write_timeout_s} s "
                               "and may still be applied: read it back with GET, or repeat it (writes are idempotent)",
                               headers={"Retry-After": "5"})

            def send(shard: int, op: str, *args):
                return _bounded(lambda: version.shards[shard].write.remote(op, id_, *args), self.cfg.write_timeout_s,
                                unknown, keep_running=True)

            try:
                if version.router.cells is None:
                    return await send(version.router.shards_for_id(id_)[0], op, *args)
                # Under cells an upsert can move an id to another shard: a read of its holders,
                # then writes to two shards. One write of an id at a time, in this replica (a
                # queue) and across replicas (the id's lock file), so two of them cannot both move
                # it and leave two copies, nor a flag be set between the read and the move.
                async with self.id_locks.hold(id_), id_lock(version.info["index_dir"], id_):
                    found = await version.holders(id_, self.cfg.shard_timeout_s)
                    if op != "upsert":  # a delete or a flag reaches every copy, even a stray one
                        for holder, _ in found:
                            await send(holder, op, *args)
                        return bool(found)
                    target = version.router.shard_for_write(id_, vector)
                    if found:  # flags belong to the id, not to the shard that held it
                        uri, sha, _, _, phash = args[1:]
                        args = (args[0], uri, sha, any(m["private"] for _, m in found),
                                any(m["unsafe"] for _, m in found), phash)
                    await send(target, op, *args)
                    for holder, _ in found:
                        if holder != target:  # the id moved cells: its old copy goes
                            await send(holder, "delete")
                    return bool(found)
            except SealedError:  # this replica has not yet heard of a version switch: the shard fenced it
                raise ApiError(503, "writes_paused", "the index switched versions; retry in a few seconds",
                               headers={"Retry-After": "2"}) from None
        finally:
            self.writes_in_flight -= 1

    async def _readable_roots(self) -> list[str]:
        """Folders whose files the service reads (thumbnails, verification) and a writer's ?uri=
        may name: those the index was built from and those the operator allowed, in the config
        or while it runs. Any other file stays unread, whatever a writer claims."""
        info = (await self._index()).info
        return self.cfg.uri_roots + self.routing.uri_roots + info.get("sources", [])

    async def _writer_uri(self, request: Request) -> str:
        return parse_uri(request.query_params.get("uri"), self.cfg.uri_schemes, await self._readable_roots())

    async def _upsert(self, id_: int, vector, uri: str, data: bytes, phash, **extra) -> Response:
        existed = await self._write("upsert", id_, vector, uri, hashlib.sha256(data).hexdigest(), None, None, phash,
                                    vector=np.asarray(vector, np.float32))
        return JSONResponse({"id": id_, "created": not existed, **extra}, status_code=200 if existed else 201)

    async def add_image(self, request: Request) -> Response:
        """POST /images: add an image under an id the service derives, returned in the answer. A
        `uri` under a folder the index was built from gets the id the build gives that path (so
        an indexed file is recognised, not duplicated); otherwise the id is a hash of the bytes, so
        a retried upload names the same image."""
        self._authorize_write(request)
        uri = await self._writer_uri(request)
        vector, data, phash = await self._embed_upload(request, for_index=True)
        id_, id_from = derived_id(uri, data, (await self._index()).info.get("sources", []))
        return await self._upsert(id_, vector, uri, data, phash, id_from=id_from)

    async def image(self, request: Request) -> Response:
        """GET (metadata), PUT (add or replace), DELETE and PATCH (flags) of one image id."""
        id_ = parse_image_id(request.path_params["id"])
        if request.method == "GET":
            self._authorize_read(request)
            _, meta = await (await self._index()).lookup(id_, self.cfg.shard_timeout_s)
            # Private and unsafe images do not exist for readers: ids are guessable from paths.
            if meta is None or ((meta["private"] or meta["unsafe"]) and not self._is_writer(request)):
                raise ApiError(404, "not_found", f"no image {id_}")
            return JSONResponse(meta)
        self._authorize_write(request)
        if request.method == "PUT":
            uri = await self._writer_uri(request)
            vector, data, phash = await self._embed_upload(request, for_index=True)
            return await self._upsert(id_, vector, uri, data, phash)
        if request.method == "DELETE":
            if not await self._write("delete", id_):
                raise ApiError(404, "not_found", f"no image {id_}")
            return JSONResponse({"id": id_, "deleted": True})
        flags = parse_flags(await read_body(request, 4096))
        if not await self._write("flags", id_, None, "", "", flags.get("private"), flags.get("unsafe")):
            raise ApiError(404, "not_found", f"no image {id_}")
        return JSONResponse({"id": id_, **flags})

    # ------------------------------------------------------------------ web page and thumbnails

    async def page(self, request: Request) -> Response:
        """The search page (deployments/web/): no data in it, so no token needed to load it."""
        return Response(self.page_html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def asset(self, request: Request) -> Response:
        """The page's script and style sheet: only the files ASSETS names, never a path from the URL."""
        name = request.path_params["name"]
        if name not in ASSETS:
            raise ApiError(404, "not_found", f"no asset {name!r}")
        return Response((WEB_DIR / name).read_bytes(), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    async def thumbnail(self, request: Request) -> Response:
        """A JPEG of an indexed image, made from the file at its catalog uri when that lies under
        a folder the service may read (`_readable_roots`). Revalidated with its ETag (the image's sha256 and the
        size); 404 for unknown, private and unsafe images alike."""
        self._authorize_read(request)
        id_ = parse_image_id(request.path_params["id"])
        size = parse_size(request.query_params.get("size"), thumbnails.DEFAULT_SIZE, thumbnails.MIN_SIZE,
                          thumbnails.MAX_SIZE)
        version = await self._index()
        _, meta = await version.lookup(id_, self.cfg.shard_timeout_s)
        if meta is None or meta["private"] or meta["unsafe"]:
            raise ApiError(404, "not_found", f"no image {id_}")
        headers = {"ETag": f'"{meta["sha256"][:32] or id_}-{size}"',
                   "Cache-Control": f"{'private' if self.read_tokens else 'public'}, max-age={THUMBNAIL_MAX_AGE_S}"}
        if headers["ETag"] in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        key = (meta["uri"], meta["sha256"], size)
        data = self.thumbnails.get(key)
        if data is None:
            make = (thumbnails.make_thumbnail, meta["uri"], await self._readable_roots(), size)
            try:
                async with self.thumbnail_slots:
                    data = await asyncio.to_thread(*make, sha256=meta["sha256"], max_bytes=self.decode.max_bytes,
                                                   max_pixels=self.decode.max_pixels)
            except thumbnails.NoThumbnail as e:
                raise ApiError(404, "no_thumbnail", f"image {id_} has no thumbnail: {e}") from None
            self.thumbnails.put(key, data)
        return Response(data, media_type="image/jpeg", headers=headers)

    # ------------------------------------------------------------------ operators

    async def _shard_info(self) -> list[Optional[dict]]:
        """Each shard's info, or None for a shard that does not answer in time."""
        version = await self._index()

        async def one(h):
            try:
                return await within(h.info.remote(), self.cfg.shard_timeout_s)
            except Exception:  # down, restarting or too slow: reported as not loaded
                return None

        return list(await asyncio.gather(*[one(h) for h in version.shards]))

    async def openapi(self, request: Request) -> Response:
        """The API as OpenAPI 3 (deployments/openapi.py)."""
        return JSONResponse(openapi.document())

    async def healthz(self, request: Request) -> Response:
        down = [i for i, s in enumerate(await self._shard_info()) if s is None]
        return JSONResponse({"status": "unavailable" if down else "ok", "shards_down": down},
                            status_code=503 if down else 200)

    async def stats(self, request: Request) -> Response:
        """Counts for every reader; with read tokens set, where the index lives and how its logs and
        memory stand only for operators (a write token)."""
        self._authorize_read(request)
        operator = self.read_tokens is None or self._is_writer(request)
        infos = await self._shard_info()
        total = sum(s["count"] for s in infos) if all(infos) else None
        keys = ("count", "generation", "log_bytes", "rss_bytes", "load_rss_bytes") if operator else ("count",)
        shards = [{"shard": i, "loaded": s is not None, **{k: (s or {}).get(k) for k in keys}} for i, s in enumerate(infos)]
        hidden = ("slot_table", "cell_table", "template", "shards")
        hidden += () if operator else ("index_dir",)
        info = {k: v for k, v in (await self._index()).info.items() if k not in hidden}
        ops = {"fast_paths_off": self.fast_paths_off} if operator else {}
        return JSONResponse({**info, "index_app": self.routing.index_app, "writes_paused": self.routing.writes_paused,
                             "total": total, "shards": shards, **ops})


def _page(cfg: ServeConfig, *, needs_token: bool) -> bytes:
    """index.html with this service's limits filled in (the page's controls honour them)."""
    html = (WEB_DIR / "index.html").read_text()
    for key, value in (("DEFAULT_K", cfg.default_k), ("MAX_K", cfg.max_k), ("MAX_NPROBE", cfg.max_nprobe),
                       ("NEEDS_TOKEN", str(needs_token).lower())):
        html = html.replace(f"{{{{{key}}}}}", str(value))
    return html.encode()


async def _flush_logs_every(seconds: float) -> None:
    """Write out the buffered log lines of this replica every `seconds`."""
    handlers = [h for h in logging.getLogger("ray.serve").handlers if isinstance(h, logging.handlers.MemoryHandler)]
    while handlers:
        await asyncio.sleep(seconds)
        for h in handlers:
            h.flush()


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)
