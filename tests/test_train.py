"""Contrastive training: the loss, the batches, and a short real run on Ray Train that lowers the
loss, resumes from its checkpoint and exports a model the embedder loads."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.schema import ModelConfig, TrainConfig, load_config
from training.losses import supcon_loss
from training.sources import TrainError, load_sources
from training.train import epoch_batches, run_training
from tests.images import picture


def test_supcon_with_two_views_is_nt_xent():
    z = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 1, 0, 1])
    s = (z @ z.T / 0.5).numpy()
    expected = []
    for i, p in [(0, 2), (1, 3), (2, 0), (3, 1)]:  # hand-written NT-Xent, anchor i with positive p
        others = [math.exp(s[i, a]) for a in range(4) if a != i]
        expected.append(-math.log(math.exp(s[i, p]) / sum(others)))
    assert supcon_loss(z, labels, 0.5).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_supcon_rewards_separation_and_needs_positives():
    apart = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert supcon_loss(apart, labels, 0.1) < supcon_loss(mixed, labels, 0.1)
    with pytest.raises(ValueError, match="no positive"):
        supcon_loss(apart, torch.arange(4), 0.1)


def test_batches_hold_positive_groups():
    t = TrainConfig(batch_size=12, per_class=3)
    data = {"n": 30, "categories": [i % 5 for i in range(30)], "pairs": [(0, 7)]}
    batches = epoch_batches(data, t, epoch=0)
    seen = [i for b in batches for i, _ in b]
    assert sorted(set(seen)) == list(range(30)) and all(4 <= len(b) <= 12 for b in batches)
    for b in batches:
        labels = [lab for _, lab in b]
        assert all(labels.count(lab) >= 2 for lab in labels)  # every view has a positive
        for (i, li), (j, lj) in zip(b, b[1:]):
            if li == lj and data["categories"][i] != data["categories"][j]:
                assert {i, j} == {0, 7}  # the click pair is the only cross-category positive
    self_sup = epoch_batches({"n": 10, "categories": None, "pairs": []}, t, epoch=1)
    assert all(b[k][0] == b[k + 1][0] for b in self_sup for k in range(0, len(b), 2))  # two views per image


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(24):  # 18 train (5 batches of up to 8 views), 6 held out
        (root / ("a" if i < 12 else "b") / f"p{i:02d}.jpg").write_bytes(picture(i))
    return root


def small_config(**train):
    return load_config(None, {
        "model": {"image_size": 64, "batch_size": 16},
        "train": {"epochs": 1, "batch_size": 8, "bank_views": 3, "cpus_per_worker": 0.25, "holdout": 0.25,
                  "lr": 0.01, "out_dim": 32, "hidden_dim": 64, **train},
    })


def test_short_run_lowers_loss_resumes_and_exports(ray_session, images, tmp_path):
    from embedding.embedder import Embedder

    out = tmp_path / "out"
    s = run_training(str(images), str(out), small_config())
    before, after = s["history"][0]["val_loss"], s["history"][1]["val_loss"]
    assert after < before, s["history"]
    assert s["train_images"] == 18 and s["heldout_images"] == 6
    assert set(s["evaluation"]["trained"]) == {"near_dup_recall@1_heavy", "near_dup_recall@1_mild"}
    assert "warning" in s and "training_seconds" in s
    assert json.loads((out / "train.json").read_text())["epochs"] == 1

    emb = Embedder(ModelConfig(image_size=64, weights=s["model"]))
    x = emb.embed_bytes([picture(i) for i in range(5)])
    assert x.shape == (5, 32) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    base = Embedder(ModelConfig(image_size=64)).embed_bytes([picture(0)])
    assert base.shape == (1, 1280)

    with pytest.raises(TrainError, match="--resume"):
        run_training(str(images), str(out), small_config())
    s2 = run_training(str(images), str(out), small_config(epochs=2), resume=True)
    assert s2["epochs"] == 2 and [h["epoch"] for h in s2["history"]] == [0, 1, 2]
    assert s2["history"][1] == s["history"][1]  # epoch 1 came from the checkpoint, not a rerun


def test_sources_are_checked(images, tmp_path):
    cfg = small_config()
    labels = tmp_path / "labels.csv"
    labels.write_text("path,category\n" + "".join(f"{p.relative_to(images)},{p.parent.name}\n"
                                                   for p in sorted(images.rglob("*.jpg"))))
    data = load_sources(str(images), str(labels), None, cfg)
    assert len(data.paths) == 18 and sorted(set(data.heldout_categories)) == ["a", "b"]  # held out per category
    labels.write_text("path,category\nmissing.jpg,a\n")
    with pytest.raises(TrainError, match="rows \\[1\\]"):
        load_sources(str(images), str(labels), None, cfg)
    pairs = tmp_path / "clicks.jsonl"
    pairs.write_text('{"query": "a/p00.jpg", "clicked": "b/p12.jpg"}\nnot json\n')
    with pytest.raises(TrainError, match="line 2"):
        load_sources(str(images), None, str(pairs), cfg)
    pairs.write_text('{"query": "a/p00.jpg", "clicked": "b/p12.jpg"}\n')
    assert load_sources(str(images), None, str(pairs), cfg).pairs


def test_two_workers_train_an_unfrozen_tail_data_parallel(ray_session, images, tmp_path):
    """One run for what were two tests (each run pays Ray Train's start): an unfrozen tail trains
    only the last layers, and two workers take equal steps."""
    from embedding.model import build_model

    s = run_training(str(images), str(tmp_path / "out"), small_config(unfreeze_last=2, holdout=0, workers=2, epochs=2))
    base = build_model(ModelConfig()).state_dict()
    trained = build_model(ModelConfig(weights=s["model"])).state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    # the last two layers the backbone runs: the head conv and its batch norm's affine weights
    # (running statistics stay: eval mode); not the classifier it never runs
    assert changed == {"backbone.net._conv_head.weight", "backbone.net._bn1.weight", "backbone.net._bn1.bias"}
    assert s["evaluation"] == {}  # nothing held out
    # 24 training images x 2 views in batches of 8 views: 6 batches, so three steps per worker;
    # unequal step counts would leave DDP's all-reduce waiting forever.
    assert s["epochs"] == 2 and [h["steps"] for h in s["history"][1:]] == [3, 3]


def test_pca_start_keeps_the_principal_geometry():
    from configs.schema import ConfigError
    from embedding.model import projection_head
    from training.train import init_pca

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) @ torch.tensor([[5.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.1, 0]]) + 3
    head = projection_head(4, 2, 0)
    assert len(head) == 1  # hidden_dim 0: one linear layer
    init_pca(head[0], x)
    y = head(x).detach()
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)  # centred
    assert torch.allclose(y.std(0), torch.tensor([5.0, 2.0]), rtol=0.1)  # the two largest directions
    with pytest.raises(ConfigError, match="head_init"):
        load_config(None, {"train": {"head_init": "pca", "hidden_dim": 64}})  # an MLP head cannot start as PCA
    shipped = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "train-selfsupervised.yaml"))
    assert shipped.train.head_init == "pca" and shipped.train.hidden_dim == 0


def test_koleo_spreads_embeddings_apart():
    from training.losses import koleo_loss

    gen = torch.Generator().manual_seed(0)
    crowd = torch.nn.functional.normalize(torch.ones(16, 8) + 0.01 * torch.randn(16, 8, generator=gen), dim=-1)
    spread = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    assert koleo_loss(crowd) > koleo_loss(spread)
    z = crowd.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=0.05)
    nearest = lambda x: (torch.cdist(x, x) + 4 * torch.eye(16)).min(1).values.mean()  # noqa: E731
    before = nearest(torch.nn.functional.normalize(z.detach(), dim=-1))
    for _ in range(20):
        opt.zero_grad()
        koleo_loss(z).backward()
        opt.step()
    assert nearest(torch.nn.functional.normalize(z.detach(), dim=-1)) > 2 * before


def test_labelled_loss_keeps_two_views_of_one_photo_nearer_than_its_category():
    """The category loss alone cannot tell a batch whose views pair up by photo from one whose
    views are swapped between two photos of one category: both are 'all bedrooms together'. The
    instance part of the multi-task loss can, which is what keeps an edited copy nearest its
    original after training with labels (issue 32)."""
    from training.train import multitask_loss

    a, b, c = F.normalize(torch.tensor([[1.0, 0.2, 0], [1.0, -0.2, 0], [0, 0, 1.0]]), dim=-1)
    labels, images = [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]  # photos 0 and 1 share a category
    paired = torch.stack([a, a, b, b, c, c])   # each photo's two views together
    swapped = torch.stack([a, b, a, b, c, c])  # the same vectors, views crossed between the photos
    t = TrainConfig(instance_weight=0.0)
    assert multitask_loss(paired, labels, images, t, labelled=True) == pytest.approx(
        multitask_loss(swapped, labels, images, t, labelled=True).item())
    t = TrainConfig(instance_weight=0.5)
    assert multitask_loss(paired, labels, images, t, labelled=True) < multitask_loss(swapped, labels, images, t,
                                                                                     labelled=True)
    want = 0.5 * supcon_loss(paired, torch.tensor(labels), t.temperature) + \
        0.5 * supcon_loss(paired, torch.tensor(images), t.temperature)
    assert multitask_loss(paired, labels, images, t, labelled=True).item() == pytest.approx(want.item())
    # Without labels the positives are the views of a photo already: the loss is unchanged.
    assert multitask_loss(paired, images, images, t, labelled=False).item() == pytest.approx(
        supcon_loss(paired, torch.tensor(images), t.temperature).item())


def test_the_job_warns_when_training_cost_copy_detection():
    from training.train import copy_warning, trade_off

    report = {"pretrained": {"ndcg@10": 0.80, "map": 0.6, "near_dup_recall@1_heavy": 0.30, "near_dup_recall@1_mild": 0.95},
              "trained": {"ndcg@10": 0.89, "map": 0.8, "near_dup_recall@1_heavy": 0.05, "near_dup_recall@1_mild": 0.40}}
    msg = copy_warning(report, TrainConfig(instance_weight=0.0))
    assert "0.050 vs 0.300" in msg and "train.instance_weight (now 0.0" in msg
    line = trade_off(report)
    assert "categories nDCG@10 0.800 -> 0.890 (+0.090)" in line and "copies recall@1 heavy 0.300 -> 0.050 (-0.250)" in line
    report["trained"]["near_dup_recall@1_heavy"] = 0.26  # within 0.05: no warning
    assert copy_warning(report, TrainConfig()) is None
    assert copy_warning({}, TrainConfig()) is None  # nothing held out, nothing to compare
