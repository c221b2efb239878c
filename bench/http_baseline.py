"""The floor any HTTP front pays on this machine: one process, uvicorn + Starlette + FAISS in
memory, the same JSON request and answer as POST /search/vector, no Ray, no validation beyond
the dimension, no ranking. `python -m bench.http_baseline --index FILE --port P --nprobe N`."""
from __future__ import annotations

import argparse

import faiss
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(index: faiss.Index, nprobe: int) -> Starlette:
    """A Starlette app answering POST /search/vector from one in-memory index."""
    async def search(request: Request) -> Response:
        obj = orjson.loads(await request.body())
        x = np.asarray(obj.get("vectors") or [obj["vector"]], dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=int(obj.get("nprobe", nprobe)))
        D, I = index.search(x, int(obj.get("k", 10)), params=params)
        rows = [[{"id": int(i), "score": float(s)} for s, i in zip(d, ids) if i >= 0] for d, ids in zip(D, I)]
        return Response(orjson.dumps({"results": rows if "vectors" in obj else rows[0]}), media_type="application/json")

    return Starlette(routes=[Route("/search/vector", search, methods=["POST"])])


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--index", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nprobe", type=int, default=16)
    args = p.parse_args()
    faiss.omp_set_num_threads(1)  # one query per request: threads only add overhead
    uvicorn.run(make_app(faiss.read_index(args.index), args.nprobe), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
