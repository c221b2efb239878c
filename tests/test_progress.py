"""Progress of long jobs: plain lines when the output is a file, a redrawn bar on a terminal."""
import io
import time

from configs.progress import Progress, duration, poll


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_output_gets_plain_lines_and_a_summary():
    out = io.StringIO()
    with Progress("embedding", 10, "images", file=out, every_s=0) as p:
        for _ in range(3):
            time.sleep(0.01)
            p.update()
        p.update(7)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[2].startswith("embedding: 3/10 images (30%), ") and " images/s, " in lines[2] and lines[2].endswith(" left")
    assert lines[-1].startswith("embedding: 10/10 images in 0:00, ") and lines[-1].endswith(" images/s")


def test_plain_lines_are_spaced_out():
    out = io.StringIO()
    with Progress("ingest", 1000, file=out, every_s=3600) as p:
        for _ in range(1000):
            p.update()
    assert out.getvalue().count("\n") == 1  # only the summary: no line per item


def test_a_terminal_gets_a_redrawn_bar():
    out = Terminal()
    with Progress("rebalancing", 4, "vectors", file=out) as p:
        p.update(2)
        p.update(2)
    text = out.getvalue()
    assert "\r" in text and "|" in text and "rebalancing" in text
    assert text.rstrip().splitlines()[-1].startswith("rebalancing: 4/4 vectors in ")


def test_a_job_that_fails_says_it_stopped_and_a_job_with_its_own_summary_prints_none():
    out = io.StringIO()
    try:
        with Progress("bench", 5, "benchmarks", file=out) as p:
            p.update()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    [line] = out.getvalue().splitlines()
    assert line.startswith("bench: 1/5 benchmarks in 0:00, ") and line.endswith(" (stopped early)")
    quiet = io.StringIO()
    with Progress("ingest", 2, file=quiet, summary=False) as p:
        p.update(2)
    assert quiet.getvalue() == ""


def test_poll_feeds_a_count_kept_elsewhere():
    out, counter = io.StringIO(), {"n": 0}
    with Progress("embedding", 100, file=out, every_s=0) as p:
        stop = poll(p, lambda: counter["n"], every_s=0.01)
        counter["n"] = 40
        deadline = time.time() + 5
        while p.done < 40 and time.time() < deadline:
            time.sleep(0.01)
        stop()
    assert p.done == 40 and "40/100 images (40%)" in out.getvalue()


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3600 * 2 + 61)] == ["0:00", "1:00", "1:01", "2:01:01"]
