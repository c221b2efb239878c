"""`python -m bench VERB --out DIR [--quick]`: serving (HTTP vs in-process)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("verb", choices=["serving", "all"])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--index-dir", default="data/demo-index", help="index to benchmark (built by `make demo-index`)")
    p.add_argument("--quick", action="store_true", help="small sizes that finish in minutes on 2 cores")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not os.path.exists(os.path.join(args.index_dir, "manifest.json")):
        print(f"error: no index at {args.index_dir}; run `make demo-index` or pass --index-dir", file=sys.stderr)
        return 2
    from bench.serving import bench_serving

    payload = bench_serving(os.path.abspath(args.index_dir), args.out, quick=args.quick)
    print(open(os.path.join(args.out, "serving.md")).read())
    return 0 if payload["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
