"""HTTP request parsing and error bodies for the ingress; plain Starlette, importable without Ray.

Every rejection is an ApiError that becomes `{"error": {"code", "message"}}` with its status.
"""
from __future__ import annotations

import hmac
from typing import Any, Optional

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

BINARY_VECTORS = "application/octet-stream"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small fields around the image
# Largest magnitude of a query vector entry: far beyond any embedding, far below float32 overflow
# of a score (dim x entry^2 stays finite).
MAX_VECTOR_ENTRY = 1e15


class JSONResponse(Response):
    """JSON through orjson: several times faster than json.dumps on result lists, and numpy aware."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(Exception):
    """A request the service refuses, with the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status,
                            headers=self.headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes max_bytes (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_request", f"bad Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise ApiError(413, "body_too_large", f"body is {declared} bytes, over the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image(request: Request, max_bytes: int) -> bytes:
    """Image bytes from a raw `image/*` or octet-stream body, or from a multipart field `image`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await read_body(request, max_bytes)
    elif ctype == "multipart/form-data":
        # The body is counted as it streams in (with or without a Content-Length) and refused past
        # the limit plus room for the multipart framing; only then does Starlette parse it.
        body = await read_body(request, max_bytes + MULTIPART_OVERHEAD)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as e:  # malformed multipart
            raise ApiError(400, "invalid_multipart", f"cannot parse multipart body: {e}") from None
        part = form.get("image")
        if part is None or isinstance(part, str):
            raise ApiError(400, "missing_image", "multipart body needs a file field named 'image'")
        data = await part.read()
        if len(data) > max_bytes:
            raise ApiError(413, "image_too_large", f"image is {len(data)} bytes, over the limit of {max_bytes}")
    else:
        raise ApiError(
            415, "unsupported_media_type",
            f"content type {ctype or '(none)'!r} is not supported: send image/*, application/octet-stream "
            "or multipart/form-data with a field 'image'",
        )
    if not data:
        raise ApiError(400, "empty_body", "the request has no image bytes")
    return data


def _integer(raw, lo: int, hi: int, name: str) -> int:
    """An integer in lo..hi from a JSON integer or a query-string of digits, else 422: no floats,
    booleans, exponents or signs, so 2.5, true, 1e3 and 10**30 are all refused the same way."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        v = raw
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 19:
        v = int(raw)
    else:
        v = None
    if v is None or not lo <= v <= hi:
        shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:40] + "..."
        raise ApiError(422, f"invalid_{name}", f"{name} must be an integer in {lo}..{hi}, got {shown}")
    return v


def parse_k(raw, default: int, max_k: int) -> int:
    """k from a query string or JSON value; 422 unless an integer in 1..max_k."""
    return default if raw is None else _integer(raw, 1, max_k, "k")


def parse_nprobe(raw, max_nprobe: int) -> Optional[int]:
    """Optional per-request nprobe; 422 unless an integer in 1..max_nprobe."""
    return None if raw is None else _integer(raw, 1, max_nprobe, "nprobe")


def parse_size(raw, default: int, lo: int, hi: int) -> int:
    """A thumbnail size in pixels; 422 unless an integer in lo..hi."""
    return default if raw is None else _integer(raw, lo, hi, "size")


def vector_body_limit(content_type: str, dim: int, max_vectors: int) -> int:
    """Largest body a vector search can need: the binary size, or about 32 characters per number
    of JSON. A body past it is refused before any parsing."""
    if content_type.split(";")[0].strip().lower() == BINARY_VECTORS:
        return 4 * dim * max_vectors
    return 32 * dim * max_vectors + 4096


def parse_vector_request(body: bytes, content_type: str, dim: int, max_vectors: int) -> tuple[np.ndarray, bool, dict]:
    """Query vectors from a request body -> ((n, dim) float32, batched?, JSON options).

    JSON: {"vector": [...]} or {"vectors": [[...], ...]}, with optional "k", "nprobe", "dedupe".
    `application/octet-stream`: n*dim little-endian float32 values, options in the query string
    (no JSON to parse: the cheapest way in for clients that already hold float32 arrays)."""
    if content_type.split(";")[0].strip().lower() == BINARY_VECTORS:
        if not body or len(body) % (4 * dim):
            raise ApiError(422, "wrong_dimension", f"a binary body must hold n x {dim} float32 values "
                           f"(a multiple of {4 * dim} bytes), got {len(body)} bytes")
        if len(body) // (4 * dim) > max_vectors:
            raise ApiError(422, "too_many_vectors", f"{len(body) // (4 * dim)} vectors, the limit is {max_vectors}")
        x = np.frombuffer(body, dtype="<f4").reshape(-1, dim).astype(np.float32)
        batched, obj = True, {}
    else:
        obj = parse_json(body)
        if not isinstance(obj, dict) or ("vector" in obj) == ("vectors" in obj):
            raise ApiError(422, "invalid_request", "JSON must be an object with exactly one of 'vector' or 'vectors'")
        batched = "vectors" in obj
        rows = obj["vectors"] if batched else [obj["vector"]]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise ApiError(422, "invalid_vector", "'vectors' must be a non-empty list of lists of numbers")
        if len(rows) > max_vectors:
            raise ApiError(422, "too_many_vectors", f"{len(rows)} vectors, the limit is {max_vectors}")
        bad = [len(r) for r in rows if len(r) != dim]
        if bad:
            raise ApiError(422, "wrong_dimension", f"vectors must have dimension {dim}, got {bad[0]}")
        try:
            raw = np.asarray(rows)  # one C pass; strings, nulls or nested lists give a non-numeric dtype
        except (TypeError, ValueError, RecursionError):
            raw = np.zeros(0, dtype=object)
        if raw.dtype.kind not in "iuf" or raw.shape != (len(rows), dim):  # [[0.1, 0.2]] * dim is 3-d
            raise ApiError(422, "invalid_vector", "vector entries must be numbers")
        x = raw.astype(np.float32)
    if not (np.abs(x) <= MAX_VECTOR_ENTRY).all():  # also false for inf and NaN
        raise ApiError(422, "invalid_vector", f"vector entries must be finite, of magnitude at most {MAX_VECTOR_ENTRY:g}")
    return x, batched, obj


def parse_json(body: bytes) -> Any:
    """orjson.loads with every failure (syntax, nesting past its depth limit, numbers past a
    double) as a 400."""
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {e}") from None


def bearer_token(request: Request) -> Optional[str]:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def load_tokens(config: Optional[str], overrides: dict) -> tuple[list[str], list[str]]:
    """(write tokens, read tokens) as the replica that calls this sees them: `serve.write_tokens` /
    `serve.read_tokens` of the app config, the YAML file `serve.tokens_file` names (keys
    write_tokens, read_tokens), and the environment variables IMSEARCH_WRITE_TOKENS /
    IMSEARCH_READ_TOKENS (comma-separated). Read inside the replica, so no token travels as a
    deployment argument that the Ray dashboard would show."""
    import os

    import yaml

    from configs.schema import ConfigError, load_config

    serve = load_config(config, overrides).serve
    write, read = list(serve.write_tokens), list(serve.read_tokens)
    if serve.tokens_file:
        try:
            with open(serve.tokens_file) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"serve.tokens_file {serve.tokens_file}: {e}") from None
        if not isinstance(data, dict) or set(data) - {"write_tokens", "read_tokens"}:
            raise ConfigError(f"serve.tokens_file {serve.tokens_file}: expected keys write_tokens and/or read_tokens")
        write += [str(t) for t in data.get("write_tokens") or []]
        read += [str(t) for t in data.get("read_tokens") or []]
    for name, out in (("IMSEARCH_WRITE_TOKENS", write), ("IMSEARCH_READ_TOKENS", read)):
        out += [t.strip() for t in os.environ.get(name, "").split(",") if t.strip()]
    return write, read


def token_in(token: Optional[str], allowed: frozenset[str]) -> bool:
    """Whether the token is one of `allowed`, comparing every candidate in constant time so the
    answer's timing says nothing about how much of a token was right."""
    if not token:
        return False
    given = token.encode()
    return any([hmac.compare_digest(given, a.encode()) for a in allowed])


def check_token(request: Request, allowed: frozenset[str], *, what: str) -> None:
    """401 without `Authorization: Bearer <token>`, 403 with a token not in `allowed`."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthorized", f"{what} need an 'Authorization: Bearer <token>' header")
    if not token_in(token, allowed):
        raise ApiError(403, "forbidden", f"this token may not perform {what}")


MAX_URI = 2048


def parse_uri(raw: Optional[str], schemes: list[str], roots: list[str]) -> str:
    """A writer's `?uri=`, 422 unless it is empty, a relative path without `..`, a URI with an
    allowed scheme, or an absolute path (or `file:` URI) under one of `roots`: what a page or a
    job may later open or link must not point anywhere a writer likes."""
    from indexing.storage import is_under

    if not raw:
        return ""
    if len(raw) > MAX_URI or any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ApiError(422, "invalid_uri", f"uri must be at most {MAX_URI} printable characters")
    head, colon, _ = raw.partition(":")
    scheme = head.lower() if colon and head[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in head) else ""
    if scheme and scheme != "file":
        if scheme in schemes and raw[len(scheme) + 1 :].startswith("//"):
            return raw
        raise ApiError(422, "invalid_uri", f"uri scheme {scheme!r} is not accepted: use one of {schemes}, "
                       "a relative path, or a path under the index's image folders")
    if scheme or raw.startswith("/"):
        if is_under(raw, roots):
            return raw
        raise ApiError(422, "invalid_uri", "an absolute uri must lie under the folders the index was built from, "
                       "serve.uri_roots, or a folder the operator allowed with `python -m deployments allow FOLDER`")
    if ".." in raw.replace("\\", "/").split("/"):
        raise ApiError(422, "invalid_uri", "a relative uri may not contain '..'")
    return raw


def parse_image_id(raw: str) -> int:
    """A path id: an int64 in 0..2**63-1, else 422."""
    try:
        v = int(raw)
    except ValueError:
        v = -1
    if not 0 <= v < 2**63:
        raise ApiError(422, "invalid_id", f"image id must be an integer in 0..2^63-1, got {raw!r}")
    return v


def parse_flags(body: bytes) -> dict:
    """{"private": bool, "unsafe": bool}, at least one of them, else 400/422."""
    obj = parse_json(body)
    if not isinstance(obj, dict) or not obj or set(obj) - {"private", "unsafe"}:
        raise ApiError(422, "invalid_flags", "body must be a JSON object with 'private' and/or 'unsafe'")
    if not all(isinstance(v, bool) for v in obj.values()):
        raise ApiError(422, "invalid_flags", "'private' and 'unsafe' must be true or false")
    return obj


def parse_bool(raw, default: bool, name: str) -> bool:
    """A query-string or JSON boolean (true/false/1/0), else 422."""
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    v = str(raw).lower()
    if v not in ("true", "false", "1", "0"):
        raise ApiError(422, f"invalid_{name}", f"{name} must be true or false, got {raw!r}")
    return v in ("true", "1")
