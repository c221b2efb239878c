"""`python -m training train --images PATH --out DIR [--labels CSV] [--pairs JSONL] [--config FILE]`.

Contrastive training on Ray Train (see training/train.py). Writes DIR/model.pt (use it with
`model.weights: DIR/model.pt`), DIR/train.json (per-epoch losses, before/after evaluation) and the
Ray Train run with its checkpoints in DIR/run (continue with --resume)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from configs import logs
from configs.schema import ConfigError, load_config
from training.sources import TrainError, load_sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="contrastive training of the projection head (and optionally the backbone tail)")
    t.add_argument("--images", required=True, help="folder of training images (label and pair paths are relative to it)")
    t.add_argument("--out", required=True, help="output folder: model.pt, train.json, run/ (checkpoints)")
    t.add_argument("--labels", help="CSV path,category: images of one category are positives")
    t.add_argument("--pairs", help='JSONL {"query": path, "clicked": path}: each line is a positive pair')
    t.add_argument("--config", help="YAML config (train: and model: sections)")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    args = p.parse_args(argv)
    logs.setup(logging.WARNING)

    try:
        cfg = load_config(args.config, {"train": {"epochs": args.epochs}} if args.epochs else None)
        data = load_sources(args.images, args.labels, args.pairs, cfg)  # before torch and Ray: a typo costs a second
    except (ConfigError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from training.train import format_report, run_training

    if args.address:
        import ray

        ray.init(address=args.address)
    try:
        summary = run_training(args.images, args.out, cfg, args.labels, args.pairs, args.resume, data)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nexported {summary['model']} after {summary['epochs']} epochs ({summary['training_seconds']} s training, "
          f"{summary['seconds']} s with the evaluation); use it with model.weights: {summary['model']}\n")
    print(format_report(summary["evaluation"]))
    print(json.dumps({k: summary[k] for k in ("train_images", "heldout_images")}))
    if summary["warning"]:
        print(f"\n{summary['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
