"""The Node.js client in clients/node, written from protos/ alone, against a real server.

It proves the .proto is enough for another language: each test runs `node clients/node/charrnn.js` as a
subprocess, the way a JavaScript user does, and reads its JSON lines.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.ops.version import project_version
from support import ROOT

NODE_DIR = ROOT / "clients" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH: the Node.js client cannot run")


@pytest.fixture(scope="module", autouse=True)
def node_modules() -> None:
    """With node present, missing dependencies are a broken checkout, not a reason to skip."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node/node_modules is missing: run `make install` (it runs npm ci in clients/node)")


def node(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([NODE, str(NODE_DIR / "charrnn.js"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"node {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_node_client_uses_nothing_but_the_proto():
    source = (NODE_DIR / "charrnn.js").read_text()
    assert "'protos', 'charrnn', 'v1', 'charrnn.proto'" in source
    assert set(re.findall(r"require\('([^']+)'\)", source)) == {
        "node:path", "node:util", "@grpc/grpc-js", "@grpc/proto-loader"}
    assert set(json.loads((NODE_DIR / "package.json").read_text())["dependencies"]) == {
        "@grpc/grpc-js", "@grpc/proto-loader"}


def test_info(hihell_server):
    info = lines(node("info", "--target", hihell_server.target))
    assert len(info) == 1
    assert info[0]["vocab"] == ["h", "i", "e", "l", "o"] and info[0]["cell"] == "rnn"
    assert info[0]["max_chars"] == hihell_server.settings.max_chars
    assert info[0]["project_version"] == project_version()


@pytest.mark.parametrize("per_char", [False, True], ids=["one-message", "six-messages"])
def test_predict_hihell(hihell_server, per_char):
    args = ["predict", "hihell", "--target", hihell_server.target] + (["--per-char"] if per_char else [])
    responses = lines(node(*args))
    assert [r["input"] for r in responses] == list("hihell")
    assert "".join(r["next"] for r in responses) == "ihello"


def test_step_chain_hihell_matches_predict(hihell_server):
    steps = lines(node("step-chain", "hihell", "--target", hihell_server.target))
    assert "".join(s["next"] for s in steps) == "ihello"
    assert len({s["state"] for s in steps}) == 6  # the state moved on every call
    predicted = lines(node("predict", "hihell", "--target", hihell_server.target))
    assert [s["probability"] for s in steps] == pytest.approx([p["probability"] for p in predicted], rel=1e-5)


def test_generate_streams_exactly_max_chars(hihell_server):
    out = lines(node("generate", "--prompt", "hi", "--max-chars", "13", "--temperature", "0",
                     "--target", hihell_server.target))
    assert len(out) == 13 and all(len(m["text"]) == 1 for m in out)
    assert [m["index"] for m in out] == list(range(13))
    assert [m["finish_reason"] for m in out] == ["FINISH_REASON_UNSPECIFIED"] * 12 + ["FINISH_REASON_LENGTH"]
    assert "".join(m["text"] for m in out).startswith("hello")


def test_seeded_generate_reproduces_and_matches_python(hihell_server):
    """Same seed -> same text; and the same text as a Python stub gets, so the request was encoded alike."""
    def text(seed: str) -> str:
        return "".join(m["text"] for m in lines(node("generate", "--prompt", "h", "--max-chars", "40",
                                                          "--temperature", "3", "--seed", seed,
                                                          "--target", hihell_server.target)))

    first = text("12345678901234567890")  # above 2**63: the uint64 must survive JavaScript
    assert text("12345678901234567890") == first
    assert text("1") != first  # high temperature: a different seed gives different text
    request = pb.GenerateRequest(prompt="h", max_chars=40, temperature=3, seed=12345678901234567890)
    assert "".join(r.text for r in hihell_server.stub.Generate(request)) == first


def _error(proc: subprocess.CompletedProcess, code: int, name: str) -> str:
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    error = json.loads(proc.stderr)["error"]
    assert (error["code"], error["name"]) == (code, name)
    return error["details"]


def _invalid(proc: subprocess.CompletedProcess) -> str:
    return _error(proc, 3, "INVALID_ARGUMENT")


@pytest.mark.parametrize("args, says", [
    (["generate", "--prompt", "hix", "--max-chars", "3"], "'x'"),
    (["predict", "hexl"], "'x'"),
    (["generate", "--prompt", "h", "--max-chars", "0"], "max_chars"),
    (["generate", "--prompt", "h", "--max-chars", "1001"], "max_chars"),  # the fixture's limit is 1000
    (["generate", "--prompt", "h", "--temperature=-1"], "temperature"),
    (["generate", "--prompt", "h", "--top-p", "1.5"], "top_p"),
], ids=["unknown-char-generate", "unknown-char-predict", "max-chars-0", "max-chars-over-limit",
        "negative-temperature", "top-p-over-1"])
def test_invalid_argument(hihell_server, args, says):
    assert says in _invalid(node(*args, "--target", hihell_server.target, check=False))


def test_forged_state_is_invalid_argument(hihell_server):
    state = bytearray(base64.b64decode(lines(node("step-chain", "hi", "--target", hihell_server.target))[-1]["state"]))
    state[-10] ^= 0x01  # one flipped bit inside the payload
    forged = base64.b64encode(bytes(state)).decode()
    assert "state" in _invalid(node("step-chain", "h", "--state", forged, "--target", hihell_server.target,
                                    check=False))


def test_state_from_another_model_is_failed_precondition(hihell_server, text_server):
    """What a client sees mid rolling deploy: a status of its own, naming the model the server runs."""
    foreign = base64.b64encode(text_server.stub.Step(pb.StepRequest(text="it"), timeout=10).state).decode()
    sha = hihell_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256
    details = _error(node("step-chain", "h", "--state", foreign, "--target", hihell_server.target, check=False),
                     9, "FAILED_PRECONDITION")
    assert f"this server runs another model (sha256 {sha[:12]}...)" in details
