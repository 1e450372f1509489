"""What the benchmark scripts share: the benchmark's model, and a server subprocess started on a free
port whose ready line names its address. Imported by bench/serve.py, bench/soak.py and bench/limits.py
(their folder is on sys.path when they run as scripts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first, ahead of bench/: `serve` must be the package, not bench/serve.py

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
READY = re.compile(r" on (\S+:\d+)")  # `python -m serve`'s and bench/ceiling.py's ready lines
HTTP_READY = re.compile(r"^charrnn http on http://(\S+:\d+)")  # `python -m serve`'s second line
ENGINE_CHILD = "--engine-child"  # bench/model_skipped.py's argument when it runs as the engine process
VOCAB_65 = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # tinyshakespeare's


def build_model(folder: Path, cell: str = "gru", layers: int = 2, hidden: int = 256) -> tuple[Path, Path]:
    """A freshly initialised model of the issue's size, exported: (model.onnx, its run folder).
    Speed does not depend on the weights."""
    import torch

    from export.to_onnx import to_onnx
    from train import checkpoint
    from train.model import CharRNN, ModelConfig

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(VOCAB_65), cell=cell, num_layers=layers, hidden_size=hidden)).eval()
    checkpoint.save(folder / checkpoint.FILENAME, {
        "model_state": model.state_dict(), "model_config": model.config.to_dict(), "vocab": VOCAB_65,
        "summary": {"corpus": "bench (random weights)", "steps": 0}})
    path = folder / "model.onnx"
    path.write_bytes(to_onnx(model, VOCAB_65, {"corpus": "bench (random weights)"}).SerializeToString())
    return path, folder


def build_int8(model_path: Path, run_dir: Path, folder: Path) -> tuple[Path, Path]:
    """The int8 export of run_dir's checkpoint (export/int8.py) with model_path's metadata, and the float Scan
    graph it quantizes (to time the graph's form apart from int8): (model.int8.onnx, model.scan.onnx)."""
    import onnx

    from export.int8 import quantize
    from export.scan_graph import scan_graph
    from export.to_onnx import rebuild
    from train import checkpoint

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    float_graph = scan_graph(rebuild(checkpoint.load(run_dir)), meta)
    int8, scan = folder / "model.int8.onnx", folder / "model.scan.onnx"
    int8.write_bytes(quantize(float_graph).SerializeToString())
    scan.write_bytes(float_graph.SerializeToString())
    return int8, scan


class ServerProcess:
    """A server subprocess, ready when constructed (`target` is its address); stderr goes to a temporary
    file, never a pipe nobody reads, and its tail is in the error when the server does not start."""

    def __init__(self, name: str, argv: list[str], timeout: float = 60.0, cwd: Path = ROOT,
                 http: bool = False) -> None:
        """http: also wait for the HTTP ready line (`http_target`)."""
        self.name = name
        self.http_target = ""
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - open until stop() closes it
        # cwd: the checkout whose `python -m serve` runs (bench/serve.py --before runs an older one).
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            if line.startswith("charrnn http on "):
                found = HTTP_READY.match(line)
                self.http_target = found.group(1) if found else ""
            else:
                match = READY.search(line)
                if match:
                    self.target = match.group(1)
            if getattr(self, "target", None) and (self.http_target or not http):
                return
        self._stderr.seek(0)
        stderr = self._stderr.read()[-2000:]
        self.stop()
        raise RuntimeError(f"{name}: no ready line (last output {line!r}); stderr: {stderr}")

    def stop(self, timeout: float = 10.0) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first, then ppid, ...; utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a server's engine process; --workers processes and their engine
    processes), from /proc; [pid] where there is no /proc."""
    if not os.path.isdir("/proc"):
        return [pid]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(proc_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    tree, at = [pid], 0
    while at < len(tree):
        tree += children.get(tree[at], [])
        at += 1
    return tree


def is_engine_process(pid: int) -> bool:
    """Whether pid runs an engine (serve/process/, or bench/model_skipped.py's stand-in). The module's
    name before the layout of issue 12 still counts, so that a run can measure a checkout from before it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool({b"serve.process.child", b"serve.engine_process",
                 ENGINE_CHILD.encode()} & set(argv))


def cpu_seconds(pid: int) -> dict[int, tuple[float, bool]] | None:
    """Per process of the server's tree: (CPU seconds, user + system, from /proc; whether it is an
    engine process). None where there is no /proc."""
    if not os.path.isdir("/proc"):
        return None
    seconds = {}
    for p in process_tree(pid):
        try:
            fields = proc_stat(p)
        except OSError:
            continue  # gone meanwhile
        seconds[p] = ((int(fields[11]) + int(fields[12])) / TICK, is_engine_process(p))
    return seconds


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-th percentile of durations in seconds, in milliseconds to 3 decimals; None without samples."""
    return round(float(np.percentile(seconds, q)) * 1e3, 3) if seconds else None


def load_columns(median: Callable[[str], float]) -> str:
    """A report row's chars/s, time to the first character and gaps between characters (p50, p99), from
    median(key) over the rounds of one load's results (bench/load.py's keys)."""
    return (f"{median('chars_per_s'):>9.0f} {median('ttfc_p50_ms'):>7.2f}ms "
            f"{median('gap_p50_ms'):>6.3f}ms {median('gap_p99_ms'):>6.3f}ms  ")


HTTP = 0  # a config's connection count that means: the HTTP load (one connection per stream) on the HTTP port


def load(target: str, streams: int, chars: int, connections: int = 1) -> dict:
    how = ["--http"] if connections == HTTP else ["--connections", str(connections)]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--target", target, "--streams",
                          str(streams), "--chars", str(chars), *how], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"load against {target} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(server: ServerProcess, streams: int, chars: int, connections: int) -> dict:
    before = cpu_seconds(server.pid)
    result = load(server.http_target if connections == HTTP else server.target, streams, chars, connections)
    after = cpu_seconds(server.pid)
    received = max(result["chars"], 1)
    result["server_us"] = result["engine_us"] = None
    if before is not None and after is not None:
        # a process that started or restarted meanwhile counts from zero
        used = {p: (after[p][0] - before.get(p, (0.0, False))[0], after[p][1]) for p in after}
        result["server_us"] = sum(s for s, _ in used.values()) / received * 1e6
        if any(engine for _, engine in used.values()):  # none: no engine process (ceiling, --engine thread)
            result["engine_us"] = sum(s for s, engine in used.values() if engine) / received * 1e6
    result["client_us"] = result["client_cpu_s"] / received * 1e6
    return result
