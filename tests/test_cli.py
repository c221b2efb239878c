"""Every job checks its arguments and inputs before it starts Ray: a typo costs a second, not ten."""
from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "rebalance": (["indexing", "rebalance", "--index-dir", "{tmp}/nothing", "--shards", "2"], "no index at"),
    "ann": (["evaluation", "ann", "--index-dir", "{tmp}/nothing"], "no index at"),
    "evaluate": (["evaluation", "run", "--labels", "{tmp}/labels.csv", "--leave-one-out"], "relative to --root"),
    "train": (["training", "train", "--images", "{tmp}/nothing", "--out", "{tmp}/out"], "not a folder"),
    "train-labels": (["training", "train", "--images", "{tmp}", "--labels", "{tmp}/missing.csv", "--out",
                      "{tmp}/out"], "missing.csv"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_ray_starts(tmp_path, case):
    argv, message = CASES[case]
    (tmp_path / "labels.csv").write_text("path,category\nnot/there.jpg,a\nnot/either.jpg,a\n")
    r = subprocess.run([sys.executable, "-m", *[a.format(tmp=tmp_path) for a in argv]], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Ray" not in r.stderr  # no local Ray was started to find that out
