"""bench/serve.py as docs/performance.md runs it, shrunk: every server starts, every load completes without
errors, and the report has its rows and ratios. Speed is not judged here (see docs/performance.md)."""

from __future__ import annotations

import re
import subprocess
import sys

from support import ROOT


def test_serving_benchmark_runs_end_to_end():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--hidden", "32", "--streams", "4",
                           "--chars", "20", "--one-stream-chars", "20", "--rounds", "2", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    for name in ("ceiling", "batched", "http (SSE)", "unbatched", "thread engine", "model skipped", "int8",
                 "batched, 4 conns", "x2 procs, 4 conns"):
        for load in ("4 streams", "1 stream "):
            row = re.search(rf"^\s*{re.escape(name)}\s+{load}\s+(\d+)\s.*\s(\d+)$", out, re.M)
            assert row, f"no {name!r} {load!r} row in:\n{out}"
            assert int(row.group(1)) > 0 and row.group(2) == "0"  # chars/s, errors
    assert re.search(r"batched / ceiling, 4 streams:\s+\d+\.\d\d  \(rounds ", out), out
    assert re.search(r"http \(SSE\) / batched, 4 streams:\s+\d+\.\d\d  \(rounds .*target >= 0.7", out), out
    assert re.search(r"x2 procs, 4 conns / batched, 4 conns, 4 streams:\s+\d", out), out
    assert "batch   4: onnxruntime" in out
    # the int8 export's rows: served (above, and its ratio) and its step beside the float file's
    assert re.search(r"int8 / batched, 4 streams:\s+\d+\.\d\d  \(rounds ", out), out
    for batch in ("  1", "  4"):
        step = rf"batch {batch}: int8 +\d+\.\d us \( *\d+ chars/s\), \d+\.\d\dx the float file's step"
        assert re.search(step, out), out
    assert "goal >= 1.5 at batch 64" not in out  # a shrunk run has no batch 64 to judge
    assert re.search(r"caps batched / ceiling near \d", out)
    assert re.search(r"could not pass batched / ceiling = \d", out)
    # the engine column: the engine processes' share, n/a where there is none
    assert re.search(r"^\s*ceiling\s+4 streams\s.*\sn/a\s+\S+\s+0$", out, re.M), out
    assert re.search(r"^\s*batched\s+4 streams\s.*\s\d+\.\d\s+\S+\s+0$", out, re.M), out


def test_serving_benchmark_compares_another_checkout(tmp_path):
    """--before runs the batched server of another checkout in the same rounds (here: this one, copied)."""
    before = tmp_path / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), "HEAD"], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--hidden", "32", "--streams", "4",
                               "--chars", "20", "--one-stream-chars", "20", "--rounds", "2", "--workers", "1",
                               "--before", str(before), "--only", "batched,before"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for streams in ("4 streams:", "1 stream:"):
        assert re.search(rf"batched / before, {streams}\s+\d+\.\d\d  \(rounds .*target >= 0.95", proc.stdout), \
            proc.stdout
    assert not re.search(r"^\s*ceiling\s", proc.stdout, re.M)  # --only left it out
    refused = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--before", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a checkout of this repository" in refused.stderr


def test_limits_benchmark_measures_refusals_and_freed_slots(text_model):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "limits.py"), "--model", str(text_model),
                           "--rounds", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert re.search(r"refused over capacity: median \d+\.\d ms, worst \d+\.\d ms", proc.stdout)
    assert re.search(r"slot free after cancel: median \d+\.\d ms, worst \d+\.\d ms", proc.stdout)


def test_prompt_cache_benchmark_runs_end_to_end():
    """bench/prompt_cache.py shrunk: both servers start, every load completes, the four rows print with
    both columns and a ratio (speed is judged by the full run, quoted in docs/prompt-cache.md)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prompt_cache.py"), "--hidden", "32", "--rounds", "2",
                           "--total-chars", "2000", "--calls", "4", "--streams", "4", "--prefix", "200", "--short",
                           "50", "--chars", "10"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for row in (r"\(a\) conversation of 4 calls to 2000 chars: last call TTFC", r"\(a\) conversation: server CPU",
                r"\(b\) 4 streams, 200-char prefix seen once: TTFC p50", r"\(c\) nothing hits, 4 streams x 10 chars"):
        # the shrunk run's CPU seconds can read 0 (a 10 ms clock tick): that row then says n/a, not a ratio
        ratio = r"(\d+\.\d\dx  \(rounds |n/a  \(a round measured 0).*" if "CPU" in row else r"\d+\.\d\dx  \(rounds .*"
        assert re.search(rf"^{row}.*\s\d+\.\d+\S*\s+\d+\.\d+\S*\s+{ratio}goal >=", proc.stdout, re.M), \
            proc.stdout


def test_breakdown_attributes_every_load_to_buckets():
    """bench/breakdown.py shrunk (py-spy on a real server and its engine process, both engines, two loads):
    every column has a chars/s and a server total, and the buckets share that total out, the model call
    among them (a profile that lost the engine process would show no onnxruntime time)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "breakdown.py"), "--hidden", "32", "--streams", "1,4",
                           "--chars", "400", "--rate", "250"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"^\s+process x1\s+process x4\s+thread x1\s+thread x4$", out, re.M), out

    def row(name: str) -> list[float]:
        found = re.search(rf"^{re.escape(name)}\s+(.*)$", out, re.M)
        assert found, f"no {name!r} row in:\n{out}"
        return [float(v) for v in found.group(1).split()]

    buckets = ["onnxruntime", "sampling", "scheduler", "engine hop", "metrics", "gRPC/protobuf", "service",
               "event loop", "gc", "other"]
    parts = [row(b) for b in buckets]
    for column, total in enumerate(row("= server")):
        assert total > 0 and abs(sum(p[column] for p in parts) - total) <= 0.01 * total + 0.5, out
    assert all(v > 0 for v in row("onnxruntime")) and all(v > 0 for v in row("chars/s")), out
    assert all(v > 0 for v in row("ort step (wall)")), out  # the server's own step-time metric moved
