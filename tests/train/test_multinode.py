"""Multi-node torchrun for real: two launchers on 127.0.0.1 are two "nodes" of one process each (gloo), meeting
through c10d rendezvous on a free port, as docs/training.md's multi-node command has them:

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank I --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
        --rdzv-id RUN -m train --corpus tiny.txt ... --out DIR

They train the weights one process trains on the same global batch; the checkpoint exports; SIGTERM to either
node's torchrun (as kubelet or `docker stop` signals a node) stops both ranks after the same step, rank 0 saves
last.pt, and --resume on both nodes ends where the uninterrupted run ends. Nothing waits forever: every wait
has a deadline, and whatever still runs when a test ends is killed, workers included.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ddp_support import ARGS, STEPS, TOLERANCE, max_diff, weights, worker_ranks
from support import ROOT, STEP_LINE, free_port, run_stage

from train import checkpoint

LIMIT = 240  # seconds for a two-node run of STEPS steps (about 15 s on our 2-core machine)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads torchrun's workers from /proc")


def node_command(node_rank: int | str, endpoint: str, run_id: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """One node's torchrun. With c10d, torchrun ignores --node-rank (it says so): the rendezvous numbers the
    nodes; it stays, as docs/training.md's command (and a static rendezvous) has it."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", run_id, "-m", "train", "--corpus", str(corpus), *ARGS, "--out", str(out), *extra]


@dataclass
class Node:
    launcher: subprocess.Popen
    log: Path  # torchrun's stdout and stderr, and its worker's

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def two_nodes(logs: Path, corpus: Path, out: Path, *extra: str) -> Iterator[list[Node]]:
    """Both nodes' torchrun, started on one rendezvous (a free port, an id of its own). Whatever still runs when
    the block ends is killed, workers first: torchrun starts them in sessions of their own, so killing torchrun
    alone would leave them training."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test-{secrets.token_hex(4)}"
    logs.mkdir(parents=True)
    nodes: list[Node] = []
    try:
        for node_rank in (0, 1):
            log = logs / f"node{node_rank}.log"
            with log.open("w") as sink:
                launcher = subprocess.Popen(node_command(node_rank, endpoint, run_id, corpus, out, *extra), cwd=ROOT,
                                            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            nodes.append(Node(launcher, log))
        yield nodes
    finally:
        for node in nodes:
            if node.launcher.poll() is None:
                for pid in worker_ranks(node.launcher.pid).values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                node.launcher.kill()
                node.launcher.wait()


def finish(nodes: list[Node], limit: float = LIMIT) -> list[int]:
    """Both nodes' exit codes, once both have exited (TimeoutExpired past the limit: no node hangs)."""
    deadline = time.monotonic() + limit
    return [node.launcher.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]


def wait_for_step(nodes: list[Node], step: int, limit: float = LIMIT) -> None:
    """Until rank 0's progress line (on whichever node rank 0 is) reports at least this step."""
    deadline = time.monotonic() + limit
    while not any(int(n) >= step for node in nodes for n in STEP_LINE.findall(node.text())):
        exited = [node.launcher.returncode for node in nodes if node.launcher.poll() is not None]
        assert not exited, f"a node exited {exited} before step {step}:\n" + logs_of(nodes)
        assert time.monotonic() < deadline, f"no step {step} within {limit} s:\n" + logs_of(nodes)
        time.sleep(0.2)


def logs_of(nodes: list[Node]) -> str:
    """The ends of both logs, for a failure's message (torchrun's tracebacks make them long)."""
    return "\n".join(f"--- node {i}:\n{node.text()[-4000:]}" for i, node in enumerate(nodes))


def train_on_two_nodes(logs: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """A whole two-node run that must succeed: each node's log."""
    with two_nodes(logs, corpus, out, *extra) as nodes:
        codes = finish(nodes)
        assert codes == [0, 0], logs_of(nodes)
        return [node.text() for node in nodes]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, tiny_corpus) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("nodes2")
    texts = train_on_two_nodes(tmp_path_factory.mktemp("nodes2-logs") / "run", tiny_corpus, out)
    return out, texts


def test_two_nodes_train_the_same_weights_as_one_process(tmp_path, tiny_corpus, two_node_run):
    out, texts = two_node_run
    assert sum(text.count("trained at step") for text in texts) == 1  # rank 0 reports, on whichever node it is
    one = tmp_path / "one"
    run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--out", str(one), timeout=LIMIT)
    assert max_diff(weights(out), weights(one)) <= TOLERANCE
    a, b = checkpoint.load(out)["summary"], checkpoint.load(one)["summary"]
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["chars_seen"] == b["chars_seen"]
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], abs=TOLERANCE)
    saved = checkpoint.load(out, checkpoint.LAST)["resume"]
    assert saved["state"].shape == (4, 2, 32) and len(saved["rng_ranks"]) == 2  # both nodes' slices and RNGs


def test_the_two_node_checkpoint_exports(two_node_run):
    out, _ = two_node_run
    run_stage("export", str(out))  # exit 0: the file conforms and matches PyTorch (export's own check)
    assert (out / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize("rank", [0, 1], ids=["the-rank-0-node", "the-rank-1-node"])
def test_sigterm_to_either_node_stops_both_at_one_step_and_resume_continues(tmp_path, tiny_corpus, two_node_run,
                                                                            rank):
    whole, _ = two_node_run
    out = tmp_path / "parts"
    with two_nodes(tmp_path / "logs", tiny_corpus, out) as nodes:
        wait_for_step(nodes, 20)
        [node] = [node for node in nodes if rank in worker_ranks(node.launcher.pid)]
        node.launcher.send_signal(signal.SIGTERM)  # torchrun itself, which passes it on to its worker
        codes = finish(nodes)  # both exit: the other node's rank stops too, it does not wait for the one that left
        text, log = "\n".join(node.text() for node in nodes), logs_of(nodes)
    stopped = checkpoint.load(out, checkpoint.LAST)["summary"]["steps"]
    assert 20 <= stopped < STEPS, log
    assert f"SIGTERM: stopped after step {stopped}" in text, log  # rank 0 saved last.pt at that step
    assert all(code != 0 for code in codes), (codes, log)  # an interrupted run is not a finished one
    assert len(checkpoint.load(out, checkpoint.LAST)["resume"]["rng_ranks"]) == 2  # both ranks reached the save

    train_on_two_nodes(tmp_path / "resume-logs", tiny_corpus, out, "--resume")
    assert checkpoint.load(out, checkpoint.LAST)["summary"]["steps"] == STEPS
    assert max_diff(weights(out), weights(whole)) <= TOLERANCE


def test_the_docs_show_the_command_these_tests_run():
    page = (ROOT / "docs/training.md").read_text()
    match = re.search(r"^python -m torch\.distributed\.run --nnodes 2 .*?(?=\n```)", page, re.M | re.S)
    assert match, "docs/training.md: no `python -m torch.distributed.run --nnodes 2 ...` block"
    shown = shlex.split(match.group(0).replace("\\\n", " "))
    assert shown == ["python", *node_command("I", "127.0.0.1:PORT", "RUN", Path("tiny.txt"), Path("DIR"))[1:]]
