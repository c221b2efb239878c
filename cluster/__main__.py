"""`python -m cluster plan --images N ...`: capacity plan (see cluster/plan.py for the formulas)."""
from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from cluster.plan import PlanInput, format_plan, make_plan, measured, routed


def _number(text: str) -> float | int:
    """Accept 1e11 as well as 100000000000; integral values become ints."""
    v = float(text)
    return int(v) if v.is_integer() else v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    pl = sub.add_parser("plan", help="shards, memory, nodes and GPUs for a corpus")
    for name, field in PlanInput.model_fields.items():
        if name not in ("measured_bytes_per_vector", "factory", "placement"):
            pl.add_argument(f"--{name.replace('_', '-')}", type=_number, default=None, help=field.description)
    pl.add_argument("--measured", help="bench memory JSON (bench/results/memory.json): bytes per vector as measured")
    pl.add_argument("--factory", help="with --measured: the factory to size (default: the most compact measured)")
    pl.add_argument("--placement", choices=["hash", "cells"], help=PlanInput.model_fields["placement"].description)
    pl.add_argument("--routing", help="with --placement cells: bench routing JSON (routing.json): the measured "
                    "shards touched and query skew at the nearest shard count")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k in PlanInput.model_fields and v is not None}
    try:
        if args.measured:
            values["measured_bytes_per_vector"], values["factory"] = measured(args.measured, args.factory)
        if args.routing:
            values.update({k: v for k, v in routed(args.routing).items() if k not in values})
        inp = PlanInput(**values)
        plan = make_plan(inp)
    except ValidationError as e:
        print("error: " + "; ".join(f"--{'-'.join(str(x) for x in er['loc'])}: {er['msg']}" for er in e.errors()),
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"input": inp.model_dump(), "plan": plan}, indent=1) if args.json else format_plan(inp, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
