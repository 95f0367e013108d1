"""The scale-out files (infra/, deployments/prefect.yaml) agree with what the code reads:
the same environment variable names, ports, image, work pool and flows. Parsed, not applied:
no cluster needed."""

import importlib
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
POOL = "zooaudit-k8s"


def _docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _all_k8s():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for res in kust["resources"] for d in _docs(res)]


def _containers(doc):
    """Every container spec of a manifest (Deployment, DaskCluster, DaskWorkerGroup)."""
    spec = doc.get("spec", {})
    pods = []
    if doc["kind"] == "Deployment":
        pods.append(spec["template"]["spec"])
    elif doc["kind"] == "DaskCluster":
        pods += [spec["worker"]["spec"], spec["scheduler"]["spec"]]
    elif doc["kind"] == "DaskWorkerGroup":
        pods.append(spec["worker"]["spec"])
    return [c for p in pods for c in p["containers"]]


@pytest.fixture(scope="module")
def image():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"zooaudit-worker:{version}"


@pytest.fixture(scope="module")
def settings():
    (cm,) = [d for d in _docs("settings.yaml") if d["kind"] == "ConfigMap"]
    return cm


@pytest.fixture(scope="module")
def stack_env():
    from zooaudit_infra.stack import StackConfig, stack_env

    cfg = StackConfig()
    return cfg, stack_env(cfg, {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})


def _env_read_by_code() -> set[str]:
    """Environment variables the code reads or sets (os.environ / getenv with a literal name)."""
    names = set()
    pat = re.compile(r"""(?:environ(?:\.get|\.setdefault|\.pop)?\s*[\[(]|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    for folder in ("zooaudit", "flows", "tasks", "deployments"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(pat.findall(path.read_text()))
    return names


def test_manifests_parse_and_live_in_one_namespace():
    docs = _all_k8s()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Deployment", "DaskCluster", "DaskWorkerGroup", "Role"} <= kinds
    assert all(d["metadata"].get("namespace", "zooaudit") == "zooaudit" for d in docs)
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"] == "zooaudit"


def test_one_image_everywhere_named_after_the_package_version(image):
    images = {c["image"] for d in _all_k8s() for c in _containers(d)}
    assert images == {image}
    template = json.loads((K8S / "base-job-template.json").read_text())
    assert template["variables"]["properties"]["image"]["default"] == image
    prefect_yaml = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert {d["work_pool"]["job_variables"]["image"] for d in prefect_yaml["deployments"]} == {image}
    assert f"-t {image} " in (ROOT / "infra" / "Dockerfile").read_text()


def test_settings_use_the_names_and_ports_of_the_local_stack(settings, stack_env):
    cfg, env = stack_env
    secrets = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"}
    data = settings["data"]
    # every non-secret setting the local stack exports is set for the cluster too ...
    assert {k for k in env if k not in secrets} <= set(data)
    # ... and every name set there is one the code or its S3/Prefect clients read
    read = _env_read_by_code() | set(env)
    assert set(data) <= read, sorted(set(data) - read)
    assert not secrets & set(data)
    assert urlparse(data["PREFECT_API_URL"]).port == cfg.prefect_port and data["PREFECT_API_URL"].endswith("/api")
    assert urlparse(data["AWS_ENDPOINT_URL"]).port == cfg.s3_port
    assert urlparse(data["ZOOAUDIT_DASK_ADDRESS"]).port == cfg.dask_port
    assert data["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    assert data["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    from zooaudit.store import resolve_store_url

    assert resolve_store_url(data["ZOOAUDIT_STORE"]).startswith("s3://")


def test_secrets_come_from_a_generated_secret_never_from_the_files(settings):
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = kust["secretGenerator"]
    example = (K8S / "s3-credentials.env.example").read_text()
    keys = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and not any(keys.values())
    assert gen["envs"] == ["s3-credentials.env"]
    assert "infra/k8s/s3-credentials.env" in (ROOT / ".gitignore").read_text().splitlines()
    refs = {(k, v["name"]) for d in _all_k8s() for c in _containers(d) for e in c.get("envFrom", [])
            for k, v in e.items()}
    template = json.loads((K8S / "base-job-template.json").read_text())
    job_container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    refs |= {(k, v["name"]) for e in job_container["envFrom"] for k, v in e.items()}
    assert refs <= {("configMapRef", settings["metadata"]["name"]), ("secretRef", gen["name"])}
    assert ("secretRef", gen["name"]) in refs
    # the flow-run Jobs use only variables the template declares
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared


def test_dask_cluster_matches_the_scheduler_address(settings, stack_env):
    cfg, _ = stack_env
    (cluster,) = [d for d in _all_k8s() if d["kind"] == "DaskCluster"]
    (gpu,) = [d for d in _all_k8s() if d["kind"] == "DaskWorkerGroup"]
    addr = urlparse(settings["data"]["ZOOAUDIT_DASK_ADDRESS"])
    name, ns = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert addr.hostname.startswith(f"{name}-scheduler.{ns}.svc")   # the operator's service name
    (comm,) = [p for p in cluster["spec"]["scheduler"]["service"]["ports"] if p["name"] == "tcp-comm"]
    (sched,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert comm["port"] == addr.port == cfg.dask_port
    assert sched["args"][sched["args"].index("--port") + 1] == str(cfg.dask_port)
    assert gpu["spec"]["cluster"] == name
    (worker,) = gpu["spec"]["worker"]["spec"]["containers"]
    # the GPU group advertises the resource `zooaudit up --gpu-workers` gives its workers, the one
    # CUDA extraction tasks request (zooaudit_flows.runners.extraction_resources)
    from zooaudit_flows.runners import extraction_resources
    from zooaudit_infra.stack import dask_worker_argv

    local_gpu = dask_worker_argv(cfg, gpu=True)
    advertised = worker["args"][worker["args"].index("--resources") + 1]
    assert advertised == local_gpu[local_gpu.index("--resources") + 1]
    name, _, amount = advertised.partition("=")
    assert extraction_resources("cuda", [{name: float(amount)}]) == {name: 1}
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (cpu_worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert "--resources" not in cpu_worker["args"] and "nvidia.com/gpu" not in cpu_worker["resources"]["limits"]
    assert f"EXPOSE {cfg.dask_port}" in (ROOT / "infra" / "Dockerfile").read_text()


def test_worker_pool_and_prefect_yaml_deployments_match_the_code():
    from zooaudit_deployments.serve import build_deployments

    (worker,) = [c for d in _all_k8s() if d["kind"] == "Deployment" for c in _containers(d)]
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == POOL
    assert cmd[cmd.index("--type") + 1] == "kubernetes"
    assert f'"--pool", "{POOL}"' in (ROOT / "infra" / "Dockerfile").read_text()

    prefect_yaml = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    served = {(d.flow_name, d.name): d for d in build_deployments()}
    declared = {}
    for dep in prefect_yaml["deployments"]:
        assert dep["work_pool"]["name"] == POOL and dep["enforce_parameter_schema"] is True
        module, func = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
        declared[(flow.name, dep["name"])] = dep
    assert set(declared) == set(served)
    nightly = declared[("audit-zoo", "nightly")]
    (sched,) = nightly["schedules"]
    (served_sched,) = served[("audit-zoo", "nightly")].schedules
    assert (sched["cron"], sched["timezone"], sched["slug"]) == (
        served_sched.schedule.cron, served_sched.schedule.timezone, served_sched.slug)
    # the parameters of each deployment are valid specs of its flow
    from zooaudit.specs import AuditModelSpec, AuditZooSpec, BackfillSpec

    for (flow, _), dep in declared.items():
        spec_cls = {"audit-zoo": AuditZooSpec, "audit-model": AuditModelSpec, "backfill": BackfillSpec}[flow]
        spec_cls(**dep["parameters"]["spec"])
    AuditZooSpec(**sched["parameters"]["spec"])


def test_dockerfile_installs_every_package_and_sets_the_client_defaults():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"zooaudit", *setuptools["package-dir"].values()}
    for folder in folders:   # infra/: its Python files only (not the Dockerfile and k8s/)
        assert re.search(rf"^COPY {folder}(/\*\.py)? \./{folder}/?$", text, re.MULTILINE), folder
    assert "pip install -c constraints.txt ." in text
    # the image imports the installed names (not the copied folders from the working directory)
    names = [n for n in setuptools["packages"] if "." not in n]
    check = re.search(r'python -c "import ([^"]+)"', text)
    assert check and set(names) <= {n.strip() for n in check.group(1).split(",")}
    for setting in ("PREFECT_SERVER_ANALYTICS_ENABLED=false", "AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED"):
        assert setting in text
    assert re.search(r"^USER \d+", text, re.MULTILINE)   # not root
