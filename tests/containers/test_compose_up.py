"""`docker compose up` for real: the repository's images and compose file on a Docker engine.

One compose project of the tests' own (a random `charrnn-test-*` name, so never the user's `charrnn`
volume), ports published on 127.0.0.1 only (`CHARRNN_HOST_PORT=127.0.0.1:` lets the engine pick a
free one), the seconds-long smoke settings of docs/deployment.md. The tests below run in file order
on that one deployment: the default profile first, then the scale profile added to it (a replica
killed, then a new model rolled out without restarts), then `docker compose down -v`; the fixture takes everything
down whatever happened.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from chains import CHAINS, KILL_AT, STEPS, ChainClient
from composefile import SMOKE_ENV
from containers.engine import Project
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ROOT

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

# The first test also waits for the session's image builds (about 3 minutes on a cold cache here).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

UID = "10001"  # the user the Dockerfiles create and run as
LOOPBACK = "127.0.0.1:"  # a *_PORT setting of just an address: the engine picks a free port on it
SETTINGS = {**SMOKE_ENV, "CHARRNN_TRAIN_DEVICE": "cpu", "CHARRNN_HOST_PORT": LOOPBACK,
            "CHARRNN_METRICS_HOST_PORT": LOOPBACK, "CHARRNN_LB_PORT": LOOPBACK, "CHARRNN_HTTP_HOST_PORT": LOOPBACK,
            "CHARRNN_LB_HTTP_PORT": LOOPBACK}


def completion(address: str, stream: bool) -> str:
    """POST /v1/completions at a published HTTP address (streamed as server-sent events, or whole): its text."""
    body = json.dumps({"model": "charrnn", "prompt": "The ", "max_tokens": 60, "seed": 3, "stream": stream})
    request = urllib.request.Request(f"http://{address}/v1/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        if not stream:
            text: str = json.loads(response.read())["choices"][0]["text"]
            return text
        texts, done = [], False
        for line in response:
            if line.startswith(b"data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["text"])
            done = done or line.startswith(b"data: [DONE]")
        assert done, "the stream did not end with [DONE]"
        return "".join(texts)


def up(project: Project, *args: str, say: Callable[[str], None]) -> None:
    """`docker compose up --detach --wait` (healthchecks included), timed."""
    start = time.monotonic()
    proc = project.compose("up", "--detach", "--wait", "--no-build", *args, timeout=420, check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        pytest.fail(f"docker compose up {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}\n"
                    f"{project.logs()}", pytrace=False)
    say(f"docker compose up {' '.join(args) or '(default profile)'}: healthy in {seconds:.1f} s")


@pytest.fixture(scope="module")
def deployment(docker, images, project_name, say):
    project = Project(docker, project_name, {**SETTINGS, "CHARRNN_IMAGE_TAG": images.tag,
                                             "CHARRNN_LB_IMAGE": images.lb})
    try:
        up(project, say=say)
        yield project
    finally:
        start = time.monotonic()
        project.down()
        say(f"teardown (docker compose down -v) in {time.monotonic() - start:.1f} s")


def client(*args: str, target: str) -> subprocess.CompletedProcess:
    """The reference client from the checkout, as the docs run it."""
    proc = subprocess.run([sys.executable, "-m", "serve.client", *args, "--target", target], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_up_ran_train_and_export_to_completion_and_serve_is_healthy(deployment, docker):
    for one_shot in ("train", "export"):
        [name] = deployment.containers(one_shot)
        state = docker.inspect(name)["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), (one_shot, state)
    [serve] = deployment.containers("serve")
    assert docker.inspect(serve)["State"]["Health"]["Status"] == "healthy"


def test_ports_are_published_on_loopback_only(deployment, docker):
    [serve] = deployment.containers("serve")
    bindings = docker.inspect(serve)["HostConfig"]["PortBindings"]
    assert set(bindings) == {"50051/tcp", "8080/tcp", "9100/tcp"}
    assert all(b["HostIp"] == "127.0.0.1" for port in bindings.values() for b in port), bindings


def test_reference_client_through_the_published_port(deployment):
    target = deployment.address("serve", 50051)
    assert target.startswith("127.0.0.1:")
    info = json.loads(client("info", target=target).stdout)
    assert (info["cell"], info["hidden_size"], info["num_layers"]) == ("rnn", 8, 1)
    assert info["corpus"].startswith("default")
    text = client("generate", "--prompt", "The ", "--max-chars", "40", "--seed", "1", target=target).stdout
    assert len(text.rstrip("\n")) == 40, text


def test_completions_through_the_published_http_port(deployment):
    address = deployment.address("serve", 8080)
    assert address.startswith("127.0.0.1:")
    whole = completion(address, stream=False)
    assert len(whole) == 60 and completion(address, stream=True) == whole
    with grpc.insecure_channel(deployment.address("serve", 50051)) as channel:
        chunks = pb_grpc.CharRNNStub(channel).Generate(pb.GenerateRequest(prompt="The ", max_chars=60, seed=3),
                                                       timeout=30)
        assert "".join(c.text for c in chunks) == whole  # the same seed, the same text, either transport


def test_raw_grpc_stub_and_the_model_file_in_the_volume(deployment):
    target = deployment.address("serve", 50051)
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.CharRNNStub(channel)
        chunks = list(stub.Generate(pb.GenerateRequest(prompt="def ", max_chars=25, seed=7), timeout=30))
        assert len("".join(c.text for c in chunks)) == 25
        reply = stub.Step(pb.StepRequest(text="class"), timeout=10)
        assert reply.state and len(reply.next) == 1
        again = stub.Step(pb.StepRequest(state=reply.state, text=reply.next), timeout=10)
        assert again.state != reply.state
        sha = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256
    in_volume = deployment.exec("serve", "python", "-c", "import hashlib; print(hashlib.sha256(open("
                                "'/artifacts/models/charrnn/1/model.onnx', 'rb').read()).hexdigest())").stdout.strip()
    assert sha == in_volume, "the server serves the file export wrote to the volume"


def test_metrics_are_scraped_from_the_published_port(deployment):
    target = deployment.address("serve", 9100)
    assert target.startswith("127.0.0.1:")
    client("info", target=deployment.address("serve", 50051))
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
        body = response.read().decode()
    # The calls the tests above made, counted by rpc and status code.
    calls = r'^charrnn_calls_total\{code="OK",rpc="GetModelInfo",surface="grpc"\} [1-9]'
    assert re.search(calls, body, re.M), body[:2000]
    assert re.search(r"^charrnn_characters_generated_total [1-9]", body, re.M)


def test_containers_run_as_the_non_root_user_and_serve_mounts_the_volume_read_only(deployment, docker):
    assert deployment.exec("serve", "id", "-u").stdout.strip() == UID
    for one_shot in ("train", "export"):
        [name] = deployment.containers(one_shot)
        assert docker.inspect(name)["Config"]["User"] == f"{UID}:{UID}", one_shot
    owner = deployment.exec("serve", "stat", "-c", "%u", "/artifacts/models/charrnn/1/model.onnx").stdout
    assert owner.strip() == UID, "export wrote the model as the non-root user"
    [serve] = deployment.containers("serve")
    artifacts = [m for m in docker.inspect(serve)["Mounts"] if m["Destination"] == "/artifacts"]
    assert [(m["Type"], m["RW"]) for m in artifacts] == [("volume", False)]
    assert artifacts[0]["Name"] == f"{deployment.name}_artifacts", "the tests' own volume, not the user's"
    touch = deployment.exec("serve", "touch", "/artifacts/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr


def test_the_images_run_under_the_kubernetes_security_context(deployment, docker, images):
    """deploy/kubernetes runs every pod with a read-only root file system, no capabilities, no privilege
    escalation and an emptyDir at /tmp: the same here, for train and export, then for serve."""
    restricted = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                  "--user", f"{UID}:{UID}"]
    name = f"{deployment.name}-restricted"
    try:
        # A fresh named volume takes the image's /artifacts (owned by the user), as fsGroup makes a PVC.
        docker.run("run", "--rm", *restricted, "--volume", f"{name}:/artifacts", f"charrnn-train:{images.tag}",
                   "sh", "-c", "python -m train --out /artifacts --corpus default --cell rnn --layers 1 --hidden 8 "
                   "--time-budget 1 && python -m export /artifacts --repository /artifacts/models", timeout=180)
        docker.run("run", "--detach", "--name", name, *restricted, "--volume", f"{name}:/artifacts:ro",
                   f"charrnn-serve:{images.tag}")
        deadline = time.monotonic() + 90
        while docker.run("exec", name, "python", "-m", "serve.healthcheck", check=False).returncode != 0:
            state = docker.inspect(name)["State"]
            assert state["Running"] and time.monotonic() < deadline, (state, docker.run("logs", name).stderr)
            time.sleep(1)
    finally:
        docker.run("rm", "--force", name, check=False)
        docker.run("volume", "rm", "--force", name, check=False)


def steps_logged(docker, container: str) -> int:
    """Step calls a server logged (one line per RPC)."""
    logs = docker.run("logs", container).stderr
    return len(re.findall(r"\bStep peer=\S+ OK\b", logs))


@pytest.fixture(scope="module")
def scaled(deployment, say) -> Project:
    """The scale profile added to the running deployment, without training again (a new model is the
    rollout test's, below)."""
    deployment.env["COMPOSE_PROFILES"] = "scale"
    up(deployment, "--no-deps", "serve-replica", "lb", say=say)
    return deployment


def test_scale_profile_keeps_step_chains_whole_while_a_replica_is_killed(scaled, docker, say):
    deployment = scaled
    lb = deployment.address("lb", 50051)
    assert lb.startswith("127.0.0.1:")
    servers = [*deployment.containers("serve"), *deployment.containers("serve-replica")]
    assert len(servers) == 3, servers
    start = time.monotonic()
    direct, balanced = ChainClient(deployment.address("serve", 50051)), ChainClient(lb)
    try:
        reference = direct.run()
        assert balanced.run() == reference, "every replica answers as `serve` does: one model"
        assert balanced.retries == 0
        whole = completion(deployment.address("serve", 8080), stream=False)
        balanced_http = deployment.address("lb", 8080)
        assert [completion(balanced_http, stream=s) for s in (False, True, False, True)] == [whole] * 4
        logged = {name: steps_logged(docker, name) for name in servers}
        for name in servers[1:]:  # the replicas are reached only through the balancer
            assert logged[name] > 0, (logged, deployment.logs("lb"))
        victim = deployment.containers("serve-replica")[0]
        [victim_ip] = [n["IPAddress"] for n in docker.inspect(victim)["NetworkSettings"]["Networks"].values()]

        def kill_a_replica(k: int) -> None:
            if k == KILL_AT:
                docker.run("kill", victim)  # SIGKILL: no drain, as when a container dies

        survived = balanced.run(on_step=kill_a_replica)
    finally:
        direct.close()
        balanced.close()
    say(f"scale profile: {2 * len(CHAINS) * STEPS} Step calls through nginx and {len(CHAINS) * STEPS} direct, "
        f"a replica killed, in {time.monotonic() - start:.1f} s ({balanced.retries} retried)")
    assert survived == reference
    assert all(len(text) == len(first) + STEPS for text, first in zip(survived, CHAINS, strict=True))
    killed = docker.inspect(victim)["State"]
    assert killed["ExitCode"] == 137 or not killed["Running"], killed
    # nginx did meet the dead replica (and moved its calls on): its error log names the address.
    [lb_container] = deployment.containers("lb")
    errors = [line for line in docker.run("logs", lb_container).stderr.splitlines() if f"{victim_ip}:50051" in line]
    assert errors, deployment.logs("lb")
    say(f"nginx on the killed replica: {errors[0].split('] ', 1)[-1][:160]}")


def model_shas(target: str, calls: int = 12) -> set[str]:
    """The model SHA-256s that answer GetModelInfo through one address (a balancer: several servers)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        return {stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=20).model_sha256 for _ in range(calls)}


RELOAD_INTERVAL = 10.0  # the server's default --reload-interval, which the compose file leaves as it is
LOAD_BOUND = 30.0  # seconds for a server to load, check and switch to the new file on a busy machine


def served(docker, container: str) -> tuple[str, str]:
    """(model SHA-256, version) one server answers with, asked from inside its container."""
    out = docker.run("exec", container, "python", "-m", "serve.client", "info", "--target", "127.0.0.1:50051",
                     "--timeout", "10", check=False)
    if out.returncode != 0:
        return f"(no answer: {out.stderr[-200:]})", ""
    info = json.loads(out.stdout)
    return info["model_sha256"], info.get("model_version", "")


def versions(deployment) -> list[str]:
    """The published versions in the volume's repository, oldest first."""
    out = deployment.exec("serve", "ls", "/artifacts/models/charrnn").stdout.split()
    return sorted((v for v in out if v.isdigit()), key=int)


def running_servers(deployment, docker) -> list[str]:
    return [name for name in (*deployment.containers("serve"), *deployment.containers("serve-replica"))
            if docker.inspect(name)["State"]["Running"]]


def all_on(docker, servers: list[str], version: str, since: float) -> float:
    """Waits until every server answers with `version`; the seconds since `since` it took."""
    bound = RELOAD_INTERVAL + LOAD_BOUND
    while {served(docker, name)[1] for name in servers} != {version}:
        assert time.monotonic() - since < bound, {name: served(docker, name) for name in servers}
        time.sleep(0.5)
    return time.monotonic() - since


def test_the_model_lifecycle_as_the_docs_say(scaled, docker, say):
    """docs/deployment.md, "Model lifecycle": (a) train and export again unchanged: no new version, no
    reload; (b) another model (CHARRNN_HIDDEN) while a client streams through the balancer: the stream
    finishes, every server switches to the new version by itself, no restart; (c) roll back: every server
    back on the previous version."""
    deployment = scaled
    servers = running_servers(deployment, docker)
    started = {name: docker.inspect(name)["State"]["StartedAt"] for name in servers}
    [first] = versions(deployment)
    before = {served(docker, name) for name in servers}
    assert len(before) == 1 and next(iter(before))[1] == first

    # (a) unchanged: nothing trains, nothing is published, nothing reloads
    proc = deployment.compose("up", "--no-build", "train", "export", timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr + deployment.logs("train", "export")
    assert versions(deployment) == [first]
    time.sleep(RELOAD_INTERVAL + 1)
    assert {served(docker, name) for name in servers} == before
    assert not any("now serving" in docker.run("logs", name).stderr for name in servers)

    # (b) another model, while a stream runs through the balancer
    lb = deployment.address("lb", 50051)
    results: list[object] = []

    def stream() -> None:
        try:
            with grpc.insecure_channel(lb) as channel:
                chunks = pb_grpc.CharRNNStub(channel).Generate(
                    pb.GenerateRequest(prompt="The ", max_chars=100_000, seed=1), timeout=240)
                results.append(sum(1 for _ in chunks))
        except grpc.RpcError as error:
            results.append(error)
    reader = threading.Thread(target=stream)
    reader.start()
    deployment.env["CHARRNN_HIDDEN"] = "12"
    try:
        proc = deployment.compose("up", "--no-build", "train", "export", timeout=300, check=False)
    finally:
        deployment.env["CHARRNN_HIDDEN"] = SETTINGS["CHARRNN_HIDDEN"]
    assert proc.returncode == 0, proc.stderr + deployment.logs("train", "export")
    exported = time.monotonic()
    [_, second] = versions(deployment)
    seconds = all_on(docker, servers, second, exported)
    reader.join(timeout=240)
    assert results == [100_000], results  # the stream in flight finished on the model it started on
    assert {name: docker.inspect(name)["State"]["StartedAt"] for name in servers} == started, "no restarts"
    assert model_shas(lb) == {served(docker, servers[0])[0]}, "one model behind the balancer"
    say(f"new model (CHARRNN_HIDDEN 8 -> 12) published as version {second} while a 100000-character stream ran: "
        f"all {len(servers)} servers on it {seconds:.1f} s after export finished (reload interval "
        f"{RELOAD_INTERVAL:g} s), no restart")

    # (c) roll back
    proc = deployment.compose("run", "--rm", "--no-deps", "export", "python", "-m", "export", "--repository",
                              "/artifacts/models", "--rollback", timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rolled = time.monotonic()
    assert versions(deployment) == [first]
    seconds = all_on(docker, servers, first, rolled)
    assert {served(docker, name) for name in servers} == before
    assert {name: docker.inspect(name)["State"]["StartedAt"] for name in servers} == started, "no restarts"
    say(f"rolled back to version {first}: all {len(servers)} servers on it {seconds:.1f} s after the rollback")


def test_down_v_leaves_nothing(deployment, docker, say):
    assert deployment.leftovers()["volumes"] == [f"{deployment.name}_artifacts"]
    start = time.monotonic()
    proc = deployment.down()
    assert proc.returncode == 0, proc.stderr
    say(f"docker compose down -v in {time.monotonic() - start:.1f} s")
    assert deployment.leftovers() == {"containers": [], "volumes": [], "networks": []}
