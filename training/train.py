"""Contrastive training of the embedding model on Ray Train.

Positives come from three sources, each a way of saying "these two pictures should be near":
  - augmentation: two random views of one image (always part of every view);
  - labels (`path,category`): images of one category;
  - clicks (JSONL `{"query", "clicked"}`): a query image and the image a user picked for it.
A batch holds several positive groups; every other view in it is a negative (SupCon / NT-Xent).

The backbone is frozen (default) or has its last `train.unfreeze_last` layers trained at lr/10; a
projection head maps its features to `train.out_dim` and the output is L2-normalised. With a
frozen backbone each image's features are computed once for `train.bank_views` views (the first
is the plain image, the rest augmented) and reused every epoch, which makes CPU training practical.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from configs.progress import duration
from configs.schema import AppConfig, DecodeConfig, ModelConfig, TrainConfig
from training.augment import source_size, view_transform, views
from training.losses import koleo_loss, supcon_loss
from training.sources import TrainData, TrainError, load_sources
from embedding.model import EmbeddingNet, export_model, projection_head, to_input

LOG = logging.getLogger(__name__)
RUN_NAME = "run"  # Ray Train run folder under --out: same name + storage resumes from its checkpoints
MODEL_FILE = "model.pt"


def preload(root: str, paths: list[str], size: int, decode: DecodeConfig) -> np.ndarray:
    """Decode every training image once into a (N, size, size, 3) uint8 array (views crop from it)."""
    from embedding.decode import ImageDecodeError, decode_image, resize_rgb

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        with open(os.path.join(root, p), "rb") as f:
            try:
                img = decode_image(f.read(), max_bytes=decode.max_bytes, max_pixels=decode.max_pixels, draft=size)
                out[i] = resize_rgb(img, size)
            except ImageDecodeError as e:
                raise TrainError(f"{os.path.join(root, p)}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------- batches

def epoch_batches(data: dict, t: TrainConfig, epoch: int) -> list[list[tuple[int, int]]]:
    """Batches of (image index, label) items; items with one label are positives of each other.

    Labelled: groups of `per_class` images of one category, two views each. Otherwise: images, two
    views each. Click pairs: query and clicked, one view each. Labels are unique per batch group."""
    rng = random.Random(t.seed * 100_003 + epoch)
    n, cats = data["n"], data["categories"]
    groups: list[tuple[tuple, list[int]]] = []  # (positive key, image indices, one per view)
    if cats is not None:
        by_cat: dict[int, list[int]] = {}
        for i, c in enumerate(cats):
            by_cat.setdefault(c, []).append(i)
        for c, members in by_cat.items():
            rng.shuffle(members)
            groups += [(("category", c), [i for i in members[s : s + t.per_class] for _ in (0, 1)])
                       for s in range(0, len(members), t.per_class)]
    else:
        groups = [(("image", i), [i, i]) for i in range(n)]
    groups += [(("pair", j), [q, c]) for j, (q, c) in enumerate(data["pairs"])]
    rng.shuffle(groups)
    batches, cur, labels = [], [], {}
    for key, members in groups:
        if cur and len(cur) + len(members) > t.batch_size:
            batches.append(cur)
            cur, labels = [], {}
        label = labels.setdefault(key, len(labels))  # two groups of one category stay positives
        cur += [(i, label) for i in members]
    if cur:
        batches.append(cur)
    return [b for b in batches if len(b) >= 4]


# ------------------------------------------------------------------------------- the worker loop

def _trainable_layers(backbone: torch.nn.Module, last: int) -> list[torch.nn.Parameter]:
    """Parameters of the last `last` weight-holding modules that the backbone's forward runs
    (frozen: none). A module it skips, such as the classifier of EfficientNet or ResNet, is no
    layer of it: trained, it gets no gradient, and DDP with two workers fails on it."""
    if not last:
        return []
    layers = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, *_: ran.add(id(m))) for m in layers]
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, 64, 64, device=next(backbone.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    used = [m for m in layers if id(m) in ran]
    return [p for m in used[-last:] for p in m.parameters(recurse=False)]


def init_pca(layer: torch.nn.Linear, features: torch.Tensor) -> None:
    """Set a linear layer to the centred projection on the top principal directions of `features`."""
    mean = features.mean(dim=0)
    _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
    with torch.no_grad():
        layer.weight.copy_(vh[: layer.out_features])
        layer.bias.copy_(-(vh[: layer.out_features] @ mean))


def multitask_loss(z: torch.Tensor, labels: list[int], images: list[int], t: TrainConfig, labelled: bool) -> torch.Tensor:
    """SupCon over the batch's positive groups (categories, click pairs, or the two views of an
    image), and with labels also NT-Xent over images (`train.instance_weight` of the loss): a
    category head alone pulls every photo of a category to one point, and an edited copy is then
    no nearer its original than any other photo of that category."""
    lab = torch.tensor(labels, device=z.device)
    if not labelled or not t.instance_weight:
        return supcon_loss(z, lab, t.temperature)
    inst = supcon_loss(z, torch.tensor(images, device=z.device), t.temperature)
    if t.instance_weight == 1:
        return inst
    return (1 - t.instance_weight) * supcon_loss(z, lab, t.temperature) + t.instance_weight * inst


def train_loop(config: dict) -> None:
    """Ray Train worker: build the model, (re)load the checkpoint, train, report each epoch."""
    import ray
    import ray.train
    import ray.train.torch

    from embedding.backbones import load_backbone

    t, model_cfg = TrainConfig(**config["train"]), ModelConfig(**config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed + rank)
    pixels = ray.get(config["pixels"])
    data = config["data"]

    net = EmbeddingNet(load_backbone(model_cfg.name, model_cfg.weights), model_cfg.pooling).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    tail = _trainable_layers(net.backbone, t.unfreeze_last)
    for p in tail:
        p.requires_grad_(True)
    with torch.no_grad():
        in_dim = net.features(torch.zeros(1, 3, 32, 32, device=device)).shape[1]
    head_dims = (in_dim, t.out_dim, in_dim if t.hidden_dim is None else t.hidden_dim)
    net.head = projection_head(*head_dims).to(device)
    params = [{"params": net.head.parameters(), "lr": t.lr}]
    if tail:
        params.append({"params": tail, "lr": t.lr / 10})
    opt = torch.optim.AdamW(params, weight_decay=t.weight_decay)

    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
        net.load_state_dict(state["net"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming after epoch {state['epoch'] + 1} from {ckpt.path}", flush=True)
    tail_ids = {id(p) for p in tail}
    trained_names = {n for n, p in net.named_parameters() if n.startswith("head.") or id(p) in tail_ids}

    def trained_state() -> dict:
        """Only what training changes (the backbone stays in eval mode, so its statistics do not move)."""
        return {k: v for k, v in net.state_dict().items() if k in trained_names}

    # DDP averages gradients of what trains: the head, plus the unfrozen tail if any.
    trainable = ray.train.torch.prepare_model(net if tail else net.head, move_to_device=False)
    transform = view_transform(model_cfg.image_size, t.crop_scale_min, t.hue_jitter)

    def backbone_features(batch_pixels: torch.Tensor) -> torch.Tensor:
        return net.features(to_input(batch_pixels.to(device), model_cfg.mean, model_cfg.std))

    bank = None
    if not tail:  # frozen: each view's features once, reused every epoch
        from embedding.decode import resize_rgb
        from PIL import Image

        plain = np.stack([resize_rgb(Image.fromarray(x), model_cfg.image_size) for x in pixels])
        t0, rows = time.time(), []
        torch.manual_seed(t.seed)  # the same bank on every worker (and so the same PCA start)
        with torch.no_grad():
            for s in range(0, len(pixels), model_cfg.batch_size):
                idx = range(s, min(s + model_cfg.batch_size, len(pixels)))
                per_view = [backbone_features(torch.from_numpy(plain[idx.start : idx.stop]))]
                per_view += [backbone_features(views(pixels, idx, transform)) for _ in range(t.bank_views - 1)]
                rows.append(torch.stack(per_view, dim=1))
        bank = torch.cat(rows)  # (N, V, F)
        if rank == 0:
            print(f"feature bank: {len(pixels)} images x {t.bank_views} views in {time.time() - t0:.1f} s", flush=True)
        pca = t.head_init == "pca" or (t.head_init == "auto" and t.hidden_dim == 0)
        if pca and start == 0:
            init_pca(net.head[0], bank.reshape(-1, bank.shape[-1]))
        torch.manual_seed(t.seed + rank)

    def forward(items: list[tuple[int, int]], rng: random.Random) -> torch.Tensor:
        idx = [i for i, _ in items]
        if bank is None:
            z = trainable(to_input(views(pixels, idx, transform).to(device), model_cfg.mean, model_cfg.std))
        else:
            used: dict[int, list[int]] = {}
            chosen = []
            for i in idx:  # distinct views for the two copies of one image
                order = used.setdefault(i, rng.sample(range(t.bank_views), t.bank_views))
                chosen.append(order.pop() if order else rng.randrange(t.bank_views))
            z = trainable(bank[idx, chosen])
        return z

    def batch_loss(items, rng) -> torch.Tensor:
        z = forward(items, rng)
        loss = multitask_loss(z, [lab for _, lab in items], [i for i, _ in items], t, labelled=data["categories"] is not None)
        return loss + t.koleo_weight * koleo_loss(z) if t.koleo_weight else loss

    def held_loss() -> float:
        """Loss on fixed batches and fixed views, comparable across epochs."""
        torch.manual_seed(12345)
        rng = random.Random(12345)
        with torch.no_grad():
            losses = [batch_loss(b, rng).item() for b in epoch_batches(data, t, -1)[:8]]
        torch.manual_seed(t.seed + rank + 1000 * len(history))
        return float(np.mean(losses))

    if start == 0:
        history.append({"epoch": 0, "loss": None, "val_loss": held_loss()})
        if rank == 0:
            print(f"epoch 0/{t.epochs}: fixed-batch loss {history[0]['val_loss']:.4f} (before training)", flush=True)
    for epoch in range(start, t.epochs):
        t0, rng = time.time(), random.Random(t.seed * 7919 + epoch * 31 + rank)
        batches = epoch_batches(data, t, epoch)
        per = len(batches) // world  # every rank takes as many steps, or DDP's all-reduce waits forever
        if per == 0:
            raise TrainError(f"{len(batches)} batches cannot feed {world} workers: lower train.workers or batch_size")
        mine = batches[rank * per : (rank + 1) * per]
        net.head.train()
        losses = []
        for items in mine:
            loss = batch_loss(items, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        net.head.eval()
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"), "val_loss": held_loss(),
               "steps": len(mine), "seconds": round(time.time() - t0, 2)}
        history.append(row)
        metrics = dict(row)
        if rank == 0:
            per_epoch = np.mean([r["seconds"] for r in history if r.get("seconds")])
            print(f"epoch {epoch + 1}/{t.epochs}: loss {row['loss']:.4f}, fixed-batch loss {row['val_loss']:.4f} "
                  f"({len(mine)} steps, {row['seconds']:.1f} s, {len(mine) * t.batch_size / max(row['seconds'], 0.01):.0f} views/s; "
                  f"{duration(per_epoch * (t.epochs - epoch - 1))} left)", flush=True)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"epoch": epoch, "net": trained_state(), "optimizer": opt.state_dict(),
                            "history": history, "head_dims": list(head_dims)}, os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


# ------------------------------------------------------------------------------------ the driver

def run_training(images: str, out: str, cfg: AppConfig, labels: Optional[str] = None, pairs: Optional[str] = None,
                 resume: bool = False, data: Optional[TrainData] = None) -> dict:
    """Train, export `OUT/model.pt`, evaluate pretrained vs trained on the held-out images. `data`:
    the sources as `load_sources` read them already (the CLI checks them before torch loads)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from embedding.model import is_export

    t = cfg.train
    out = os.path.abspath(out)
    if is_export(cfg.model.weights):
        raise TrainError(f"model.weights {cfg.model.weights} is a trained export; training starts from a backbone")
    if os.path.isdir(os.path.join(out, RUN_NAME)) and not resume:
        raise TrainError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
    data = data or load_sources(images, labels, pairs, cfg)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    pixels = preload(images, data.paths, source_size(cfg.model.image_size), cfg.decode)
    print(f"{len(data.paths)} training images ({'labelled' if data.categories else 'self-supervised'}"
          f"{f', {len(data.pairs)} click pairs' if data.pairs else ''}), {len(data.heldout)} held out; "
          f"decoded in {time.time() - t0:.1f} s", flush=True)
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    use_gpu = t.use_gpu == "yes" or (t.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": t.model_dump(), "model": cfg.model.model_dump(), "pixels": ray.put(pixels),
                           "data": {"n": len(data.paths), "categories": data.categories, "pairs": data.pairs}},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=RUN_NAME, storage_path=out, checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainError(f"training produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    path = export(state, cfg.model, os.path.join(out, MODEL_FILE))
    summary = {"model": path, "epochs": state["epoch"] + 1, "history": state["history"],
               "train_images": len(data.paths), "heldout_images": len(data.heldout),
               "training_seconds": round(time.time() - t0, 1)}
    summary["evaluation"] = evaluate_before_after(data, cfg, path, out)
    summary["seconds"] = round(time.time() - t0, 1)  # with the evaluation
    summary["warning"] = copy_warning(summary["evaluation"], t)
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def export(state: dict, model_cfg: ModelConfig, path: str) -> str:
    """The checkpoint's network as one file `model.weights` loads."""
    from embedding.backbones import load_backbone

    net = EmbeddingNet(load_backbone(model_cfg.name, model_cfg.weights), model_cfg.pooling)
    net.head = projection_head(*state["head_dims"])
    unexpected = net.load_state_dict(state["net"], strict=False).unexpected_keys
    if unexpected:
        raise TrainError(f"checkpoint holds weights the model does not have: {sorted(unexpected)[:3]}")
    export_model(net, model_cfg.name, model_cfg.pooling, tuple(state["head_dims"]), path)
    return path


def evaluate_before_after(data: TrainData, cfg: AppConfig, trained: str, out: str) -> dict:
    """The evaluation job, pretrained vs trained, ranked with the service's policy (copies collapse,
    as `serve.near_duplicate_bits` says). With labels, category leave-one-out (nDCG@10, P@10, mAP)
    under two protocols: held-out images among themselves, and (`corpus_*`) held-out images as
    queries against every labelled image, the training images included: what a user of a service
    built from this corpus meets. Near-duplicate recall@1 under heavy edits always."""
    from embedding.embedder import Embedder
    from evaluation.edits import HEAVY_EDITS, MILD_EDITS, near_duplicate_recalls
    from evaluation.run import in_process_searcher, labelled_judgements, read_images, run_evaluation

    if not data.heldout:
        return {}
    models = {"pretrained": cfg.model, "trained": cfg.model.model_copy(update={"weights": trained})}
    report: dict = {name: {} for name in models}
    if data.heldout_categories:
        held = list(zip(data.heldout, data.heldout_categories))
        with open(os.path.join(out, "heldout.txt"), "w") as f:  # `evaluation run --queries` takes it
            f.writelines(p + "\n" for p in data.heldout)
        # Click-pair images outside the labels (negative categories) belong to no category.
        labelled = [(p, data.category_names[c]) for p, c in zip(data.paths, data.categories) if c >= 0] + held
        protocols = {"": labelled_judgements(held), "corpus_": labelled_judgements(labelled, data.heldout)}
        for name, m in models.items():
            app = cfg.model_copy(update={"model": m})
            for prefix, judged in protocols.items():
                search, _ = in_process_searcher(data.root, judged.database, app, "Flat")
                r = run_evaluation(judged, search, k=10)
                report[name].update({prefix + k: r[k] for k in ("ndcg@10", "p@10", "map")})
    originals = read_images(data.root, data.heldout)
    for name, m in models.items():
        found = near_duplicate_recalls(Embedder(m, cfg.decode), originals, {"heavy": HEAVY_EDITS, "mild": MILD_EDITS})
        report[name].update({f"near_dup_recall@1_{edit}": r for edit, r in found.items()})
    return report


# How far below the pretrained model's heavy-edit recall@1 a trained model may fall unremarked.
COPY_GUARD = 0.05


def copy_warning(report: dict, t: TrainConfig) -> Optional[str]:
    """The guard: a message when training cost more than COPY_GUARD of heavy-edit recall@1, naming
    the key that trades categories for copies."""
    key = "near_dup_recall@1_heavy"
    if not report or key not in report.get("trained", {}):
        return None
    before, after = report["pretrained"][key], report["trained"][key]
    if before - after <= COPY_GUARD:
        return None
    return (f"warning: the trained model finds heavily edited copies worse than the pretrained one (recall@1 "
            f"{after:.3f} vs {before:.3f}, held-out images): search by photo will miss originals it finds today. "
            f"Raise train.instance_weight (now {t.instance_weight}; 1 = copies only) to trade category quality "
            f"for copies, or serve the pretrained model for copy search")


def format_report(report: dict) -> str:
    """Before and after, side by side."""
    if not report:
        return "no held-out images: nothing evaluated (train.holdout is 0)"
    lines = [f"{'metric':<26}{'pretrained':>12}{'trained':>12}{'change':>10}"]
    for k in report["pretrained"]:
        a, b = report["pretrained"][k], report["trained"][k]
        lines.append(f"{k:<26}{a:>12.4f}{b:>12.4f}{b - a:>+10.4f}")
    if any(k.startswith("corpus_") for k in report["pretrained"]):
        lines.append("ranked as the service ranks (copies collapsed). Plain: held-out images among themselves; "
                     "corpus_: held-out queries against every labelled image, the training images included.")
    lines.append(trade_off(report))
    return "\n".join(lines)


def trade_off(report: dict) -> str:
    """One line: what training did to categories and to copies, pretrained -> trained."""
    def move(key: str, label: str) -> Optional[str]:
        if key not in report["pretrained"]:
            return None
        a, b = report["pretrained"][key], report["trained"][key]
        return f"{label} {a:.3f} -> {b:.3f} ({b - a:+.3f})"

    parts = [move("ndcg@10", "categories nDCG@10"), move("map", "mAP"),
             move("near_dup_recall@1_heavy", "copies recall@1 heavy"), move("near_dup_recall@1_mild", "mild")]
    return "trade-off: " + ", ".join(p for p in parts if p)
