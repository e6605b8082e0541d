"""The deploy configs a platform engineer applies: the cluster launcher YAML against Ray's own
schema, and the KubeRay RayJob's required fields and image / command / path consistency."""

import re
import shlex
from pathlib import Path

import yaml

from capfleet.jobs.specs import load_spec, tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"


def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def test_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((DEPLOY / "aws.yaml").read_text())
    validate_config(config)  # raises jsonschema.ValidationError on any unknown or bad field
    assert config["head_node_type"] in config["available_node_types"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard`'s tunnel
    # the head drives and schedules; caption actors land on the workers, not beside the GCS
    assert "--num-cpus=0" in head
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert "TF_USE_LEGACY_KERAS=1" in head
    assert all("TF_USE_LEGACY_KERAS=1" in c for c in config["worker_start_ray_commands"][1:])
    assert config["file_mounts"]["~/capfleet"] == "."  # the project, installed by setup
    assert any("pip install" in c and "~/capfleet" in c for c in config["setup_commands"])
    # token authentication on every node, with one token: the one the user generated
    assert "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"][1:])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # nothing secret is copied to the cluster
    for pattern in (".git", ".env", "*.pem", "*.key", "id_rsa*"):
        assert pattern in config["rsync_exclude"], pattern


def test_rayjob_manifest_is_complete_and_consistent():
    job = yaml.safe_load((DEPLOY / "rayjob-caption.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_pin()
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    containers = [c for p in pods for c in p["containers"]]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"]
    images = {c["image"] for c in containers + submitter}
    assert len(images) == 1, f"one image everywhere, got {images}"

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_pin()}-py311" in dockerfile
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    for c in containers:
        assert c["workingDir"] == workdir
        assert {"name": "TF_USE_LEGACY_KERAS", "value": "1"} in c["env"]
    # the Jobs API runs code: token authentication on head, workers and submitter, one Secret
    secrets = set()
    for c in containers + submitter:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, secrets
    assert (
        f"kubectl create secret generic {secrets.pop()[0]}"
        in (DEPLOY / "rayjob-caption.yaml").read_text()
    )
    # the image holds the package root (capfleet/__init__.py is the repository's)
    assert re.search(r"^COPY .*\b__init__\.py\b", dockerfile, re.M)

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "capfleet", "run"] and argv[-2:] == ["--address", "auto"]
    spec_file = ROOT / argv[4]  # the image holds the repository at WORKDIR
    caption = load_spec(spec_file)
    # every path in the store: the pods share no disk, and every node holds the store's keys
    for path in (caption.input, *caption.bundles, caption.out):
        assert path.startswith("s3://"), path
    for c in containers:
        assert not c.get("volumeMounts"), c["name"]
        assert {"secretRef": {"name": "capfleet-s3"}} in c["envFrom"], c["name"]
