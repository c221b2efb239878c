"""Duplicate collapse means copies, whatever model serves: a trained model that packs a category
tightly keeps its neighbours over HTTP, while exact and edited copies of one image still collapse."""
import io
import json

import httpx
import pytest
import yaml
from PIL import Image

from evaluation.__main__ import main as evaluation_main
from evaluation.edits import edited_copy
from indexing.__main__ import main as indexing_main
from tests.conftest import WRITE_TOKEN, side_apps
from tests.images import TEXTURES

APP = "trained"
READ_TOKEN = "test-reader-token"


@pytest.fixture(scope="module")
def trained(ray_session, corpus_dir, tmp_path_factory):
    """A small model trained with labels (a photo and its quadrants are one category), exported,
    an index of the test corpus built with it, and the config that names it."""
    from configs.schema import load_config
    from training.train import run_training

    root, _ = corpus_dir
    work = tmp_path_factory.mktemp("trained")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg") if p.parent.name != "broken")
    labels = work / "labels.csv"
    labels.write_text("path,category\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths))
    # A sharp SupCon head (temperature 0.05): most same-category neighbours end at cosine >= 0.97.
    train = {"epochs": 12, "batch_size": 16, "per_class": 4, "bank_views": 3, "cpus_per_worker": 0.25, "holdout": 0.25,
             "out_dim": 32, "hidden_dim": 64, "lr": 0.01, "temperature": 0.05}
    model = {"image_size": 64, "batch_size": 16}
    summary = run_training(str(root), str(work / "out"), load_config(None, {"model": model, "train": train}),
                           labels=str(labels))
    cfg = work / "served.yaml"
    # Default build reservations: with the session's service holding part of the 2 CPUs, the build
    # must scale them to what is free rather than wait forever (indexing.build.fit_to_free_cpus).
    cfg.write_text(yaml.safe_dump({"model": {**model, "weights": summary["model"]}, "index": {"factory": "Flat"}}))
    index_dir = work / "index"
    assert indexing_main(["build", "--images", str(root), "--index-dir", str(index_dir), "--shards", "2",
                          "--config", str(cfg)]) == 0
    return {"root": root, "labels": labels, "config": cfg, "index_dir": index_dir, "summary": summary}


@pytest.fixture(scope="module")
def trained_service(service, trained, tmp_path_factory):
    """The trained index served beside the session's service: front `trained` at /trained."""
    tokens = tmp_path_factory.mktemp("secrets") / "tokens.yaml"  # read by the replica, never an argument
    tokens.write_text(yaml.safe_dump({"read_tokens": [READ_TOKEN]}))
    yield from side_apps(service, APP, str(trained["index_dir"]), config=str(trained["config"]), timeout_s=240,
                         front_overrides={"write_tokens": [WRITE_TOKEN], "tokens_file": str(tokens)})


def _evaluate(tmp_path, trained, *extra) -> dict:
    out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
    assert evaluation_main(["run", "--labels", str(trained["labels"]), "--root", str(trained["root"]),
                            "--leave-one-out", "--config", str(trained["config"]), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_served_trained_model_gives_the_in_process_quality(trained, trained_service, tmp_path):
    local = _evaluate(tmp_path, trained, "--factory", "Flat")
    # The in-process evaluation does not verify (verification lifts this corpus's served nDCG@10
    # from 0.935 to 0.960: a quadrant's photo, verified, comes right after it).
    served = _evaluate(tmp_path, trained, "--url", trained_service, "--token", READ_TOKEN, "--params", "verify=false")
    assert local["queries"] == served["queries"] > 50
    for metric in ("ndcg@10", "p@10", "map"):
        assert served[metric] == pytest.approx(local[metric], abs=0.01), (metric, local, served)
    assert served["ndcg@10"] > 0.5  # a photo's quadrants come back, not one of them


def test_training_report_measures_what_the_service_returns(trained):
    report = trained["summary"]["evaluation"]
    served = report["trained"]
    # One held-out image per category: held-out-only has no relevant image; the served protocol does.
    assert {"ndcg@10", "corpus_ndcg@10", "corpus_p@10", "corpus_map", "near_dup_recall@1_heavy"} <= set(served)
    assert served["corpus_ndcg@10"] > 0.5 and served["corpus_ndcg@10"] > report["pretrained"]["corpus_ndcg@10"] - 0.2


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_exact_and_edited_copies_collapse_into_one_result(trained, trained_service):
    photo = next(p for p in sorted(trained["root"].glob("*/full.jpg")) if p.parent.name not in TEXTURES)
    original = photo.read_bytes()
    img = Image.open(io.BytesIO(original)).convert("RGB")
    copies = {
        9001: original,                                              # the same bytes under another id
        9002: _jpeg(img, 35),                                        # recompressed
        9003: edited_copy(original, scale=0.5, quality=60),          # resized
        9004: edited_copy(original, crop=0.02, scale=0.7, quality=50),  # lightly cropped
    }
    auth = {"authorization": f"Bearer {WRITE_TOKEN}", "content-type": "image/jpeg"}
    with httpx.Client(base_url=trained_service, timeout=60) as c:
        for id_, data in copies.items():
            assert c.put(f"/images/{id_}?uri=copy-{id_}", content=data, headers=auth).status_code == 201
        try:
            group = {str(photo), *(f"copy-{i}" for i in copies)}

            def search(params: str) -> list[str]:
                r = c.post(f"/search?k=20{params}", content=original, headers=auth)
                return [h["uri"].split("://", 1)[-1] for h in r.json()["results"]]

            # Verification off: it lifts the photo's quadrants (crops of it), and this is about the collapse.
            every, kept = search("&dedupe=false&verify=false"), search("&verify=false")
            assert group <= set(every)  # all five are near the query ...
            assert len(group & set(kept)) == 1  # ... and collapse into one result
            # what the collapse removes is the copies, nothing else
            others, kept_others = [u for u in every if u not in group], [u for u in kept if u not in group]
            assert kept_others[: len(others)] == others
        finally:
            for id_ in copies:
                c.delete(f"/images/{id_}", headers=auth)


def test_hash_threshold_separates_copies_from_distinct_photos(corpus_dir, capsys):
    from configs.schema import DecodeConfig
    from evaluation.edits import copy_hash_report

    root, _ = corpus_dir
    photos = [p.read_bytes() for p in sorted(root.rglob("*.jpg")) if p.parent.name != "broken"]
    rows = {r["case"]: r for r in copy_hash_report(photos, 224, 12, DecodeConfig())}
    assert rows["resize 50%, JPEG q50"]["share<=12"] >= 0.95
    assert rows["crop 2%/side, 50%, q40"]["share<=12"] >= 0.95
    assert rows["crop 10%/side, 60%, q60"]["share<=12"] < 0.5  # a large crop is another picture to the hash
    assert rows["nearest distinct image"]["share<=12"] <= 0.1
    labels = root.parent / "copies-labels.csv"
    labels.write_text("path\n" + "".join(f"{p.relative_to(root)}\n" for p in sorted(root.rglob("*/full.jpg"))))
    assert evaluation_main(["copies", "--labels", str(labels), "--root", str(root)]) == 0
    assert "| nearest distinct image |" in capsys.readouterr().out


def test_stats_keep_operator_details_for_operators(trained_service):
    """With read tokens set, /stats needs one, and only a write token sees where the index lives.
    A token from a tokens_file appears nowhere in what Serve (and so its dashboard) reports."""
    from deployments.switch import _client

    assert READ_TOKEN not in json.dumps(_client().get_serve_details())
    with httpx.Client(base_url=trained_service, timeout=30) as c:
        assert c.get("/stats").status_code == 401
        reader = c.get("/stats", headers={"authorization": f"Bearer {READ_TOKEN}"}).json()
        operator = c.get("/stats", headers={"authorization": f"Bearer {WRITE_TOKEN}"}).json()
    assert reader["total"] == operator["total"] > 0
    assert "index_dir" not in reader and set(reader["shards"][0]) == {"shard", "loaded", "count"}
    assert operator["index_dir"] and operator["shards"][0]["log_bytes"] is not None
