"""The HTTP side of a real `python -m serve` process: its ready line, --http-port -1, the drain on SIGTERM
with server-sent event streams in flight, and --workers serving HTTP from every worker on one port."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from support import ROOT

READY = re.compile(r"^charrnn serving .+ on (127\.0\.0\.1:\d+) \(CPUExecutionProvider(, 2 worker processes)?\)$")
HTTP = re.compile(r"^charrnn http on http://(127\.0\.0\.1):(\d+)$")


def start(model, *args: str, stderr=subprocess.PIPE) -> tuple[subprocess.Popen, list[str]]:
    """`python -m serve` and the lines it prints once ready (one, or two with HTTP on)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--device", "cpu", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=os.environ.copy())
    ready, _, _ = select.select([proc.stdout], [], [], 90)
    lines = [proc.stdout.readline().rstrip("\n")] if ready else []
    if not lines or not READY.match(lines[0]):
        proc.kill()
        pytest.fail(f"no ready line: {lines!r} {proc.communicate()[1]}")
    if "-1" not in args:  # printed right after the first: no wait
        lines.append(proc.stdout.readline().rstrip("\n"))
        if not HTTP.match(lines[1]):  # fail here, where the process is still ours to stop
            proc.kill()
            pytest.fail(f"no HTTP line: {lines!r} {proc.communicate()[1]}")
    return proc, lines


def sse(port: int, body: dict, received: list[int], i: int, results: list) -> None:
    """One streamed completion; received[i] counts its characters; results[i]: (status, chars, ended with [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        done = False
        while line := response.readline():
            if line.startswith(b"data: {") and b'"text_completion"' in line:
                received[i] += 1
            done = done or line == b"data: [DONE]\n"
        results[i] = (response.status, received[i], done)
    finally:
        conn.close()


def test_the_ready_lines_and_http_off(hihell_model):
    proc, lines = start(hihell_model)
    try:
        assert HTTP.match(lines[1]), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    proc, lines = start(hihell_model, "--http-port", "-1")
    try:
        assert lines[0].startswith("charrnn serving")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == "", "a second line without HTTP"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_sigterm_lets_sse_streams_finish_and_refuses_new_calls(text_model):
    proc, lines = start(text_model, "--max-chars", "3000", "--grace", "30", "--log-level", "WARNING")
    port = int(HTTP.match(lines[1]).group(2))
    n = 4
    received, results = [0] * n, [None] * n
    threads = [threading.Thread(target=sse, args=(port, {"model": "charrnn", "prompt": "it", "max_tokens": 3000,
                                                         "seed": i, "stream": True}, received, i, results))
               for i in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not all(received):
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # new calls are refused with 503 once the drain has begun
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/v1/completions", body=json.dumps({"model": "charrnn", "prompt": "it"}))
                response = conn.getresponse()
                status, body = response.status, response.read()
            finally:
                conn.close()
            if status == 503:
                break
            assert time.monotonic() < deadline, "never refused"
            time.sleep(0.01)
        assert b"shutting down" in body
        in_flight = sum(received) < n * 3000
        for t in threads:
            t.join(timeout=60)
        assert in_flight, "the streams had finished before the drain began: the test proves nothing"
        assert results == [(200, 3000, True)] * n
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workers_serve_http_from_every_worker_on_one_port(hihell_model, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc, lines = start(hihell_model, "--workers", "2", stderr=err)
    try:
        port = int(HTTP.match(lines[1]).group(2))
        for _ in range(16):  # a connection each: the kernel spreads them over both (all on one: 2**-15)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/completions", body=json.dumps(
                {"model": "charrnn", "prompt": "hihell", "max_tokens": 1, "temperature": 0}))
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["choices"][0]["text"] == "o"
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    served = set(re.findall(r"(worker\d) serve\.api\.http\.calls: completions ", log.read_text()))
    assert served == {"worker0", "worker1"}, log.read_text()[-3000:]
