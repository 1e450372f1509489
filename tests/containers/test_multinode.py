"""Multi-node training in containers: two containers of the training image on a Docker network the test makes
(internal: nothing there reaches out), each one node of `torchrun --nnodes 2 --rdzv-backend c10d` with the
rendezvous on node0:29400, as docs/training.md's multi-node command and an Indexed Job's pods run it. Each node has a
volume of its own, as two machines have two disks: rank 0 alone writes the run folder, on its node's volume.

Both nodes finish and the checkpoint exports; `docker stop` (SIGTERM to torchrun, the container's first
process) on either node stops both ranks after one step with last.pt saved. Every network, volume and
container is named after the session's `charrnn-test-*` name and removed whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from containers.engine import Docker
from support import STEP_LINE

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

LABEL = "org.charrnn.test=multinode"  # on everything made here, so a leftover is easy to find
PORT = 29400  # docs/training.md's rendezvous port: each node is a host of its own, so no free port is needed
LIMIT = 300  # seconds for a two-node run to end (the containers' own start included)
RUN = "/artifacts/run"
TRAIN = ("--corpus", "default", "--cell", "rnn", "--layers", "1", "--hidden", "8", "--batch-size", "4",
         "--seq-len", "32", "--dropout", "0", "--log-every", "1", "--eval-every", "100000", "--save-every", "100000",
         "--out", RUN)
# what rank 0 saved, read by the image's own code from the volume
SUMMARY = ("import json; from train import checkpoint; c = checkpoint.load('/artifacts/run', checkpoint.LAST); "
           "print(json.dumps({'steps': c['summary']['steps'], 'world_size': c['summary']['world_size'], "
           "'ranks': len(c['resume']['rng_ranks'])}))")


def node_command(node: int, run_id: str, *train: str) -> list[str]:
    return ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"node0:{PORT}", "--rdzv-id", run_id, "-m", "train", *TRAIN, *train]


@dataclass
class Nodes:
    docker: Docker
    image: str
    containers: list[str]
    volumes: list[str]

    def wait(self, limit: float = LIMIT) -> list[int]:
        """Both containers' exit codes once both have exited (TimeoutExpired past the limit)."""
        deadline = time.monotonic() + limit
        return [int(self.docker.run("wait", name, timeout=max(1.0, deadline - time.monotonic())).stdout)
                for name in self.containers]

    def logs(self, tail: str = "200") -> str:
        """Both containers' output: its last lines (for a failure's message), or "all" of it (to search)."""
        out = []
        for i, name in enumerate(self.containers):
            proc = self.docker.run("logs", "--tail", tail, name, check=False)
            out.append(f"--- node{i} ({name}):\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)

    def wait_for_step(self, step: int, limit: float = LIMIT) -> None:
        """Until rank 0's progress line (on whichever node) reports at least this step."""
        deadline = time.monotonic() + limit
        while not any(int(n) >= step for n in STEP_LINE.findall(self.logs(tail="20"))):
            running = [self.docker.inspect(name)["State"]["Running"] for name in self.containers]
            assert all(running), f"a node exited before step {step}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"no step {step} within {limit} s:\n{self.logs()}"
            time.sleep(0.5)

    def on_volume(self, node: int, *command: str) -> subprocess.CompletedProcess:
        """A command in a fresh container of the image with that node's volume (no network)."""
        return self.docker.run("run", "--rm", "--network", "none", "--label", LABEL, "--volume",
                               f"{self.volumes[node]}:/artifacts", self.image, *command, check=False, timeout=180)

    def run_holder(self) -> int:
        """The node whose volume holds the run (there must be exactly one: rank 0's)."""
        holders = [node for node in (0, 1) if self.on_volume(node, "test", "-f", f"{RUN}/last.pt").returncode == 0]
        assert len(holders) == 1, f"last.pt on the volumes of nodes {holders}:\n{self.logs()}"
        return holders[0]

    def summary(self, node: int) -> dict:
        proc = self.on_volume(node, "python", "-c", SUMMARY)
        assert proc.returncode == 0, proc.stderr
        summary: dict = json.loads(proc.stdout)
        return summary


@contextmanager
def two_nodes(docker: Docker, image: str, name: str, *train: str) -> Iterator[Nodes]:
    """A network, a volume per node, and both nodes' containers started (node0 first: it hosts the rendezvous);
    all of it removed when the block ends."""
    network, nodes = f"{name}-net", (0, 1)
    containers, volumes = [f"{name}-node{i}" for i in nodes], [f"{name}-artifacts{i}" for i in nodes]
    try:
        docker.run("network", "create", "--internal", "--label", LABEL, network)
        for volume in volumes:
            docker.run("volume", "create", "--label", LABEL, volume)
        for node, container, volume in zip(nodes, containers, volumes, strict=True):
            # the hostname is the name the other node resolves (the network alias): torchrun advertises
            # rank 0's address by it, and gloo binds the address it resolves to
            docker.run("run", "--detach", "--name", container, "--hostname", f"node{node}", "--network", network,
                       "--network-alias", f"node{node}", "--label", LABEL, "--volume", f"{volume}:/artifacts",
                       image, *node_command(node, name, *train))
        yield Nodes(docker, image, containers, volumes)
    finally:
        docker.run("rm", "--force", *containers, check=False, timeout=120)
        docker.run("volume", "rm", "--force", *volumes, check=False, timeout=120)
        docker.run("network", "rm", network, check=False, timeout=120)


def test_two_containers_train_as_two_nodes_and_the_checkpoint_exports(docker, images, project_name, say):
    start = time.monotonic()
    with two_nodes(docker, f"charrnn-train:{images.tag}", f"{project_name}-nodes", "--steps", "40") as nodes:
        codes = nodes.wait()
        seconds = time.monotonic() - start
        logs = nodes.logs()
        assert codes == [0, 0], logs
        assert nodes.logs(tail="all").count("trained at step 40") == 1, logs  # rank 0 reports, on whichever node it is
        holder = nodes.run_holder()
        assert nodes.summary(holder) == {"steps": 40, "world_size": 2, "ranks": 2}
        exported = nodes.on_volume(holder, "python", "-m", "export", RUN)
        assert exported.returncode == 0, exported.stderr  # the file conforms and matches PyTorch
        assert nodes.on_volume(holder, "test", "-s", f"{RUN}/model.onnx").returncode == 0
    say(f"two nodes (containers, c10d rendezvous) trained 40 steps in {seconds:.1f} s, rank 0 on node{holder}")


# node0 hosts the rendezvous and, its name sorting first, is usually rank 0 (torchrun's c10d rendezvous orders
# the nodes by address); node1 is the other
@pytest.mark.parametrize("stopped", [0, 1], ids=["node0", "node1"])
def test_docker_stop_on_either_node_stops_both_at_one_step(docker, images, project_name, say, stopped):
    with two_nodes(docker, f"charrnn-train:{images.tag}", f"{project_name}-stop{stopped}", "--steps",
                   "100000") as nodes:
        nodes.wait_for_step(10)
        start = time.monotonic()
        docker.run("stop", "--time", "60", nodes.containers[stopped], timeout=120)  # SIGTERM to torchrun
        codes = nodes.wait(limit=120)  # the other node ends too: its rank does not wait for the one that left
        seconds = time.monotonic() - start
        logs = nodes.logs()
        assert all(code != 0 for code in codes), (codes, logs)  # an interrupted run is not a finished one
        summary = nodes.summary(nodes.run_holder())
        assert 10 <= summary["steps"] < 100000 and summary["ranks"] == 2, (summary, logs)
        # rank 0 saved last.pt at that step (searched in all the output: torchrun's tracebacks come after it)
        assert f"SIGTERM: stopped after step {summary['steps']}" in nodes.logs(tail="all"), logs
    say(f"docker stop node{stopped}: both nodes stopped after step {summary['steps']} in {seconds:.1f} s")
