"""The evaluation job on generated data: in-process, against the service, and the ANN sweep."""
import json
import tempfile

import numpy as np
import pytest

from evaluation.__main__ import main as evaluation_main
from evaluation.ann import ann_sweep
from evaluation.run import Judgements, score
from indexing.__main__ import main as indexing_main


def test_score_perfect_and_worst_rankings():
    j = Judgements(["q"], ["a", "b", "c", "d"], {"q": {"a", "b"}})
    best = score(j, [["a", "b", "c", "d"]], k=2, recall_ks=[1, 2])
    worst = score(j, [["c", "d", "a", "b"]], k=2, recall_ks=[1, 2])
    assert best["ndcg@2"] == best["map"] == best["mrr"] == best["recall@2"] == 1.0
    assert worst["ndcg@2"] == worst["p@2"] == 0.0 and worst["map"] == pytest.approx((1 / 3 + 2 / 4) / 2)


@pytest.fixture(scope="module")
def labelled(corpus_dir):
    """path,category labels: a photo and its quadrants share a category."""
    root, _ = corpus_dir
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg") if p.parent.name != "broken")
    (root / "labels.csv").write_text("path,category\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths))
    return root, paths


def test_run_leave_one_out_in_process(ray_session, labelled, tmp_path, monkeypatch):
    root, paths = labelled
    out = tmp_path / "m.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # Whole-image vectors (no index views): one forward pass per image, the metrics' bookkeeping is the subject.
    whole = tmp_path / "whole.yaml"
    whole.write_text("model:\n  index_views: []\n")
    assert evaluation_main(["run", "--labels", str(root / "labels.csv"), "--leave-one-out", "--out", str(out),
                            "--config", str(whole)]) == 0
    assert list(scratch.iterdir()) == []  # the temporary index it searched is gone
    m = json.loads(out.read_text())
    assert m["queries"] == len([p for p in paths if not p.split("/")[0] in _textures()])
    for key in ("ndcg@10", "p@10", "map", "mrr", "recall@1"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mrr"] > 0.5  # a quadrant's best match is usually its own photo


def _textures():
    from tests.images import TEXTURES

    return TEXTURES


def test_run_against_the_service(service, image_index_dir, labelled, tmp_path):
    root, _ = labelled
    out = tmp_path / "svc.json"
    assert evaluation_main(["run", "--labels", str(root / "labels.csv"), "--leave-one-out",
                            "--url", service, "--out", str(out)]) == 0
    svc = json.loads(out.read_text())
    assert svc["mrr"] > 0.5 and svc["depth"] <= 1000


def test_run_needs_a_protocol(labelled, capsys):
    root, _ = labelled
    assert evaluation_main(["run", "--labels", str(root / "labels.csv")]) == 2
    assert "--leave-one-out" in capsys.readouterr().err


def test_ann_sweep_recall_grows_with_nprobe(ray_session, tmp_path, rng):
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "x.npy", x)
    assert indexing_main(["build", "--vectors", str(tmp_path / "x.npy"), "--index-dir", str(tmp_path / "ix"),
                          "--factory", "IVF32,Flat", "--shards", "2"]) == 0
    res = ann_sweep(str(tmp_path / "ix"), [1, 4, 32], num_queries=200)
    r = [row["recall@10"] for row in res["rows"]]
    assert r[0] < r[1] < r[2] and r[2] == pytest.approx(1.0)
    assert evaluation_main(["ann", "--index-dir", str(tmp_path / "ix"), "--nprobe", "1", "8",
                            "--queries", "50", "--out", str(tmp_path / "ann")]) == 0
    assert (tmp_path / "ann" / "ann.png").stat().st_size > 0


def test_csv_without_header_and_wrong_root_are_named(labelled, tmp_path, capsys):
    root, paths = labelled
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{p},{p.split('/')[0]}\n" for p in paths))  # no header: its first row would vanish
    assert evaluation_main(["run", "--labels", str(bare), "--root", str(root), "--leave-one-out"]) == 2
    assert "first row must be the header path,category" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    good.write_text("path,category\n" + "".join(f"{p},{p.split('/')[0]}\n" for p in paths))
    assert evaluation_main(["edits", "--labels", str(good)]) == 2  # paths relative to tmp_path: wrong root
    assert "relative to --root" in capsys.readouterr().err


def test_url_holding_none_of_the_labelled_images_is_an_error(service, tmp_path, capsys):
    from tests.images import picture

    for i in range(3):
        (tmp_path / f"other{i}.jpg").write_bytes(picture(500 + i))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,category\n" + "".join(f"other{i}.jpg,x\n" for i in range(3)))
    assert evaluation_main(["run", "--labels", str(labels), "--leave-one-out", "--url", service]) == 2
    assert "none of the" in capsys.readouterr().err  # not a table of zeros
