"""The HTTP API as an OpenAPI 3 document, served at `GET /openapi.json`.

Written by hand next to the hand-written routing of `ingress.py` (the fast path has no FastAPI
layer); `tests/test_api_contract.py` holds the two together by running schemathesis against the
live service: every documented operation, no 5xx, every answer matching this schema.
"""
from __future__ import annotations

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}
HIT = {"type": "object", "required": ["id", "score", "uri"],
       "properties": {"id": {"type": "integer"}, "score": {"type": "number", "nullable": True}, "uri": {"type": "string"},
                      "same_photo": {"type": "boolean", "description": "present and true on the query's own file and on a "
                                     "verified copy of it (local features matched): why it comes before "
                                     "higher-scored results"},
                      "inliers": {"type": "integer", "description": "RANSAC inliers of a verified copy of the query"},
                      "coverage": {"type": "number", "description": "share of the query's area its inliers span "
                                   "(verified copies: the source of the query explains all of it)"}}}
HITS = {"type": "array", "items": HIT}
SEARCH = {"type": "object", "required": ["results", "collapsed", "partial", "took_ms"],
          "properties": {"results": {"oneOf": [HITS, {"type": "array", "items": HITS}]},
                         "collapsed": {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}],
                                       "description": "hits folded into a better result as copies of it"},
                         "partial": {"type": "boolean"}, "took_ms": {"type": "number"},
                         "verified": {"type": "boolean", "description": "image search: the top results were "
                                      "checked by geometric verification (verified copies carry `inliers` and `coverage`)"}}}
IMAGE_META = {
    "type": "object", "required": ["id", "uri", "sha256", "private", "unsafe"],
    "properties": {"id": {"type": "integer"}, "uri": {"type": "string"}, "sha256": {"type": "string"},
                   "private": {"type": "boolean"}, "unsafe": {"type": "boolean"},
                   "perceptual_hash": {"type": "string", "nullable": True}},
}
IMAGE_BODY = {
    "required": True,
    "content": {
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                           "properties": {"image": {"type": "string", "format": "binary"}}}},
    },
}
BEARER = [{"bearer": []}]


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): _json(ERROR, "an error: code and message") for c in codes}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


K = _query("k", {"type": "integer", "minimum": 1}, "results per query (at most serve.max_k)")
NPROBE = _query("nprobe", {"type": "integer", "minimum": 1}, "IVF cells to visit (at most serve.max_nprobe)")
DEDUPE = _query("dedupe", {"type": "boolean"}, "collapse copies (default true)")
URI = _query("uri", {"type": "string", "maxLength": 2048}, "where the image lives")
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0},
      "description": "image id (int64)"}
# Every answer the admission and deadline machinery can give, on top of an operation's own errors.
COMMON = (400, 401, 403, 404, 413, 415, 422, 503)


def document() -> dict:
    """The OpenAPI 3.0 document of the service."""
    search = {"200": _json(SEARCH, "results, best first"), **_errors(*COMMON)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "imsearch", "version": "1", "description": "Reverse image search: upload a photo, get the most similar images."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/search": {"post": {
                "summary": "Search by image", "security": BEARER + [{}], "requestBody": IMAGE_BODY,
                "parameters": [K, NPROBE, DEDUPE, _query("exclude_self", {"type": "boolean"},
                                                         "drop results with the query's own bytes"),
                               _query("verify", {"type": "boolean"}, "re-rank the top serve.verify_top by geometric "
                                      "verification (default serve.verify_default)")],
                "responses": search}},
            "/search/vector": {"post": {
                "summary": "Search by vector(s)", "security": BEARER + [{}], "parameters": [K, NPROBE, DEDUPE],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "vector": {"type": "array", "items": {"type": "number"}},
                        "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        "k": {"type": "integer"}, "nprobe": {"type": "integer"}, "dedupe": {"type": "boolean"}}}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": search}},
            "/embed": {"post": {
                "summary": "The vector of an image", "security": BEARER + [{}], "requestBody": IMAGE_BODY,
                "parameters": [_query("index", {"type": "boolean"}, "the vector the index holds for this image "
                                      "(whole image plus model.index_views centre crops) instead of its query vector")],
                "responses": {"200": _json({"type": "object", "required": ["vector", "dim", "took_ms"], "properties": {
                    "vector": {"type": "array", "items": {"type": "number"}}, "dim": {"type": "integer"},
                    "took_ms": {"type": "number"}}}, "the query vector, or with ?index=true the index vector"),
                    **_errors(*COMMON)}}},
            "/images": {"post": {
                "summary": "Add an image under an id the service derives (from its path under an indexed folder, "
                           "else from its bytes)", "security": BEARER, "requestBody": IMAGE_BODY,
                "parameters": [URI],
                "responses": {k: _json({"type": "object", "required": ["id", "created", "id_from"], "properties": {
                    "id": {"type": "integer"}, "created": {"type": "boolean"},
                    "id_from": {"type": "string", "enum": ["path", "content"]}}}, d)
                    for k, d in (("200", "already held: replaced"), ("201", "added"))} | _errors(*COMMON)}},
            "/images/{id}": {
                "parameters": [ID],
                "get": {"summary": "Metadata of an image (404 for private or unsafe ones without a write token)",
                        "security": BEARER + [{}],
                        "responses": {"200": _json(IMAGE_META, "the image's metadata"), **_errors(*COMMON)}},
                "put": {"summary": "Add or replace an image", "security": BEARER, "requestBody": IMAGE_BODY,
                        "parameters": [URI],
                        "responses": {k: _json({"type": "object", "required": ["id", "created"], "properties": {
                            "id": {"type": "integer"}, "created": {"type": "boolean"}}}, d)
                            for k, d in (("200", "replaced"), ("201", "added"))} | _errors(*COMMON)},
                "delete": {"summary": "Delete an image", "security": BEARER,
                           "responses": {"200": _json({"type": "object", "required": ["id", "deleted"]}, "deleted"),
                                         **_errors(*COMMON)}},
                "patch": {"summary": "Set visibility flags", "security": BEARER,
                          "requestBody": {"required": True, "content": {"application/json": {"schema": {
                              "type": "object", "properties": {"private": {"type": "boolean"},
                                                               "unsafe": {"type": "boolean"}}}}}},
                          "responses": {"200": _json({"type": "object", "required": ["id"]}, "flags set"),
                                        **_errors(*COMMON)}},
            },
            "/images/{id}/thumbnail": {"get": {
                "summary": "A JPEG thumbnail of an indexed image (404 for unknown, private or unsafe ones, and for "
                           "images whose file is not under a folder the service may read)",
                "security": BEARER + [{}], "parameters": [ID, _query("size", {"type": "integer", "minimum": 32,
                                                                              "maximum": 1024}, "longer side in pixels (default 256)")],
                "responses": {"200": {"description": "the thumbnail; revalidate with If-None-Match",
                                      "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                              "304": {"description": "the cached thumbnail is current"}, **_errors(*COMMON)}}},
            "/": {"get": {"summary": "The search page", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/ui/{name}": {"get": {
                "summary": "The page's script and style sheet",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the asset", "content": {
                    "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}}}},
                    **_errors(404)}}},
            "/healthz": {"get": {"summary": "Whether every shard answers", "responses": {
                "200": _json({"type": "object", "required": ["status", "shards_down"]}, "all shards answer"),
                "503": _json({"type": "object", "required": ["status", "shards_down"]}, "some shard is down")}}},
            "/stats": {"get": {"summary": "Index version, counts and (for operators) where it lives",
                               "security": BEARER + [{}],
                               "responses": {"200": _json({"type": "object", "required": ["total", "shards"]}, "stats"),
                                             **_errors(401, 403, 503)}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": _json({"type": "object"}, "the OpenAPI document")}}},
        },
    }
