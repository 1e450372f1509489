"""Scale-out: two servers behind nginx running the repository's deploy/nginx.conf, one killed mid-chain.

Step carries the recurrent state in the request, so a chain of Step calls may hop between replicas. The
chains are run once with both servers up, then again while one server is SIGKILLed halfway through:
every chain must finish with the same text. The test client retries a Step that fails with UNAVAILABLE
(what nginx answers for a call the dead replica had taken); Step is a pure function of its request, so
a retry is safe. nginx runs unprivileged-style: a prefix, pid, logs and temp paths in a temporary folder,
`daemon off`, loopback only. Needs Debian's `nginx` package (.ci/run installs it).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from chains import CHAINS, KILL_AT, STEPS, ChainClient
from support import ROOT

NGINX = Path("/usr/sbin/nginx")
pytestmark = [
    pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed (apt-get install nginx)"),
    pytest.mark.skipif(not (ROOT / "serve/__main__.py").exists(), reason="needs the serve stage"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upstreams(text: str, port: int, upstreams: list[str]) -> str:
    server_line = re.compile(rf"^(?P<indent>[ \t]*)server[ \t]+[\w.-]+:{port}(?P<params>[^;\n]*);[ \t]*$", re.M)
    found = list(server_line.finditer(text))
    assert len(found) == 2, f"deploy/nginx.conf: expected the serve and serve-replica upstream lines (:{port})"
    indent, params = found[0]["indent"], found[0]["params"]
    local = "\n".join(f"{indent}server {address}{params};" for address in upstreams)
    return text[:found[0].start()] + local + text[found[-1].end():]


def render_site(upstreams: list[str], listen: str, http_upstreams: list[str], http_listen: str) -> str:
    """deploy/nginx.conf with its upstream servers and listen addresses (gRPC and HTTP) replaced,
    everything else kept."""
    text = _upstreams((ROOT / "deploy/nginx.conf").read_text(), 50051, upstreams)
    text = _upstreams(text, 8080, http_upstreams)
    text, n = re.subn(r"^([ \t]*)listen[ \t]+50051[ \t]+http2;", rf"\g<1>listen {listen} http2;", text,
                      flags=re.M)
    assert n == 1, "deploy/nginx.conf: expected one `listen 50051 http2;`"
    text, n = re.subn(r"^([ \t]*)listen[ \t]+8080;", rf"\g<1>listen {http_listen};", text, flags=re.M)
    assert n == 1, "deploy/nginx.conf: expected one `listen 8080;`"
    return text


def main_conf(folder: Path, site: Path) -> str:
    """What the nginx image's own nginx.conf provides around conf.d/, with every path in `folder`."""
    temps = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
worker_processes 1;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} info;
events {{ worker_connections 256; }}
http {{
    log_format upstream '$request_uri|$status|$upstream_addr';
    access_log {folder / 'access.log'} upstream;
{temps}
    include {site};
}}
"""


def start_server(model: Path, log: Path, *args: str) -> tuple[subprocess.Popen, int, int]:
    """A server: (process, gRPC port, HTTP port)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--host", "127.0.0.1",
                             "--port", "0", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True)
    ready, http = proc.stdout.readline(), proc.stdout.readline()
    match, http_match = re.search(r"127\.0\.0\.1:(\d+)", ready), re.search(r"http://127\.0\.0\.1:(\d+)$", http)
    assert match and http_match, f"no ready lines: {ready!r} {http!r}\n{log.read_text()}"
    return proc, int(match.group(1)), int(http_match.group(1))


def wait_serving(target: str, limit: float = 30) -> None:
    from serve.tools.healthcheck import check

    deadline = time.monotonic() + limit
    while not check(target, timeout=2)[0]:
        assert time.monotonic() < deadline, f"{target} never SERVING"
        time.sleep(0.2)


def run_cluster(tmp_path: Path, model: Path, *args: str):
    """Two servers and nginx in front; yields (lb target, [server procs], [ports], nginx folder, lb HTTP port)."""
    procs, ports, http_ports = [], [], []
    nginx = None
    try:
        for n in range(2):
            proc, port, http_port = start_server(model, tmp_path / f"serve{n}.log", *args)
            procs.append(proc)
            ports.append(port)
            http_ports.append(http_port)
        folder = tmp_path / "nginx"
        folder.mkdir()
        lb_port, lb_http_port = free_port(), free_port()
        site = folder / "charrnn.conf"
        site.write_text(render_site([f"127.0.0.1:{p}" for p in ports], f"127.0.0.1:{lb_port}",
                                    [f"127.0.0.1:{p}" for p in http_ports], f"127.0.0.1:{lb_http_port}"))
        conf = folder / "nginx.conf"
        conf.write_text(main_conf(folder, site))
        command = [str(NGINX), "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")]
        test = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr
        nginx = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for port in ports:
            wait_serving(f"127.0.0.1:{port}")
        wait_serving(f"127.0.0.1:{lb_port}")  # the health RPC itself goes through nginx
        yield f"127.0.0.1:{lb_port}", procs, ports, folder, lb_http_port
    finally:
        for proc in [*procs, nginx]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*procs, nginx]:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def cluster(tmp_path, hihell_run):
    yield from run_cluster(tmp_path, hihell_run / "model.onnx")


@pytest.fixture
def text_cluster(tmp_path, text_runs):
    yield from run_cluster(tmp_path, text_runs["gru"] / "model.onnx", "--max-chars", "20000")


def upstreams_used(folder: Path, expected: int) -> list[str]:
    """For each Step call nginx logged, the replicas it tried: "A" or, after a failed try, "A, B".

    nginx writes a call's log line after the client already has its reply, so wait (briefly) until
    `expected` lines are there rather than race the last one.
    """
    deadline = time.monotonic() + 5
    while True:
        calls = [line.split("|") for line in (folder / "access.log").read_text().splitlines()]
        used = [up for uri, status, up in calls if uri == "/charrnn.v1.CharRNN/Step" and status == "200"]
        if len(used) >= expected or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def log_tails(folder: Path, lines: int = 15) -> str:
    """The end of every replica's and nginx's logs: what a failure here needs to be understood."""
    out = []
    for log in [*sorted(folder.parent.glob("serve*.log")), folder / "error.log", folder / "access.log"]:
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(missing)"]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


def test_step_chains_survive_losing_a_replica(cluster):
    target, procs, ports, folder, _ = cluster
    client = ChainClient(target)
    try:
        try:
            reference = client.run()
        except grpc.RpcError as error:  # not UNAVAILABLE (those are retried): say where it stuck
            pytest.fail(f"Step chain failed with both replicas up: {error.code()} {error.details()}\n"
                        f"{log_tails(folder)}")
        assert client.retries == 0
        used = upstreams_used(folder, len(CHAINS) * STEPS)
        assert len(used) == len(CHAINS) * STEPS
        for port in ports:  # round robin: each replica took part of every chain
            assert used.count(f"127.0.0.1:{port}") >= len(used) // 3, used

        def kill_first_replica(k: int) -> None:
            if k == KILL_AT:
                procs[0].kill()  # SIGKILL: no goodbye, as when a container dies
                procs[0].wait()

        before = len(used)
        survived = client.run(on_step=kill_first_replica)
    finally:
        client.close()
    assert survived == reference
    assert all(len(text) == len(start) + STEPS for text, start in zip(survived, CHAINS, strict=True))
    after_kill = upstreams_used(folder, 2 * len(CHAINS) * STEPS)[before + KILL_AT * len(CHAINS):]
    assert len(after_kill) == (STEPS - KILL_AT) * len(CHAINS)
    assert all(u.split(", ")[-1] == f"127.0.0.1:{ports[1]}" for u in after_kill), after_kill
    # The calls that were sent to the dead replica either moved on inside nginx (logged "dead, alive")
    # or came back UNAVAILABLE and were retried by the client; none was lost.
    assert any(", " in u for u in after_kill) or client.retries > 0
    assert procs[1].poll() is None


def test_completions_stream_through_nginx_unbuffered(text_cluster):
    """deploy/nginx.conf's HTTP side: the same text as a replica gives directly, the first character long
    before the end of a long stream (nginx buffering would hold it back), and both replicas used."""
    _, _, _, folder, lb_http = text_cluster
    body = json.dumps({"model": "charrnn", "prompt": "it", "max_tokens": 20000, "seed": 4, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", lb_http, timeout=60)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    first_at = time.perf_counter() - started
    rest = response.read()
    total = time.perf_counter() - started
    conn.close()
    assert response.status == 200 and first.startswith(b"data: {"), (first, log_tails(folder))
    assert rest.endswith(b"data: [DONE]\n\n")
    assert first_at < total / 10, (first_at, total)
    texts = set()
    for _ in range(6):  # round robin over the two replicas; a seed gives one text on either
        conn = http.client.HTTPConnection("127.0.0.1", lb_http, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "charrnn", "prompt": "it",
                                                                 "max_tokens": 40, "seed": 4}))
        texts.add(json.loads(conn.getresponse().read())["choices"][0]["text"])
        conn.close()
    assert len(texts) == 1
    streamed = "".join(json.loads(line[len(b"data: "):])["choices"][0]["text"]
                       for line in (first + rest).split(b"\n\n")[:40])
    assert streamed == texts.pop()
    deadline = time.monotonic() + 5
    while True:
        used = {line.split("|")[2] for line in (folder / "access.log").read_text().splitlines()
                if line.startswith("/v1/completions|200|")}
        if len(used) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(used) == 2, used
