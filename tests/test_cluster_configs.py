"""Structure checks for the deployment files under cluster/ (no Ray, no cluster).

They catch what a cluster would only reveal after minutes of provisioning: invalid YAML,
a head that would run training workers, no GPU worker type, an entrypoint naming a job
spec that does not exist, outputs.dir on storage the workers do not share.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"

# Top-level keys of Ray's cluster launcher schema (ray/autoscaler/ray-schema.json), which
# rejects any other key.
LAUNCHER_KEYS = {
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider",
    "auth", "docker", "head_node_type", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "metadata",
    "initialization_commands", "setup_commands", "head_setup_commands",
    "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
    "no_restart", "available_node_types",
}  # fmt: skip


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kuberay_docs(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    docs = _kuberay_docs(kind)
    assert len(docs) == 1, f"expected one {kind} under cluster/kuberay, found {len(docs)}"
    return docs[0]


def _launcher() -> dict[str, Any]:
    docs = _docs(LAUNCHER)
    assert len(docs) == 1
    return docs[0]


# ---------------------------------------------------------------------------- all files


def test_expected_files_exist():
    for rel in [
        "ray-cluster.yaml",
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/raycronjob.yaml",
    ]:
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_file_parses_to_mappings(path: Path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"
    if path.parent == KUBERAY:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path


# ---------------------------------------------------------------- cluster launcher (VMs)


def _effective_setup(cfg: dict[str, Any], name: str) -> list[str]:
    """The setup commands a node of this type runs, merged the way the launcher does."""
    node = cfg["available_node_types"][name]
    if name == cfg["head_node_type"]:
        return cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    if "worker_setup_commands" in node:  # a type's own list replaces the global ones
        return node["worker_setup_commands"]
    return cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])


def test_launcher_uses_real_schema_keys():
    cfg = _launcher()
    assert set(cfg) <= LAUNCHER_KEYS, f"unknown keys: {set(cfg) - LAUNCHER_KEYS}"
    for key in ["cluster_name", "max_workers", "provider", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"]:  # fmt: skip
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]


def test_launcher_node_types_are_well_formed():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert "resources" in node and "node_config" in node, name  # required by the schema
        assert node["node_config"].get("InstanceType"), name
        for res, amount in node["resources"].items():
            assert isinstance(amount, int) and amount >= 0, (name, res, amount)
        assert node.get("max_workers", 0) <= cfg["max_workers"], name
    assert sum(n.get("min_workers", 0) for n in types.values()) <= cfg["max_workers"]


def test_launcher_head_runs_no_training():
    cfg = _launcher()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    # The launcher hands a type's resources to `ray start` and they override --num-cpus,
    # so a non-zero CPU here would undo --num-cpus=0.
    assert head["resources"].get("CPU") == 0
    start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start


def test_launcher_has_gpu_and_cpu_worker_types():
    cfg = _launcher()
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]  # fmt: skip
    assert gpu, "no worker type with GPU resources"
    assert cpu, "no CPU-only worker type (Ray Data reads)"
    assert all(workers[n].get("max_workers", 0) >= 1 for n in gpu + cpu)
    assert "ray start --address=" in " ".join(cfg["worker_start_ray_commands"])


def test_launcher_installs_torch_and_project_on_every_node_type():
    cfg = _launcher()
    for name, node in cfg["available_node_types"].items():
        cmds = " ".join(_effective_setup(cfg, name))
        assert "torch==" in cmds, name
        assert "distributed_hte" in cmds, name
        # GPU nodes need the CUDA wheel, every other node the CPU one.
        cpu_wheel = "download.pytorch.org/whl/cpu" in cmds
        assert cpu_wheel != (node["resources"].get("GPU", 0) >= 1), name


def test_launcher_images_share_one_ray_version():
    cfg = _launcher()
    docker = cfg.get("docker", {})
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [
        t.get("docker", {}).get("worker_image") for t in cfg["available_node_types"].values()
    ]
    tags = {img.split(":", 1)[1].split("-")[0] for img in images if img}
    assert len(tags) == 1, f"head and workers must run the same Ray version: {tags}"


# ------------------------------------------------------------------------------ KubeRay


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Checks shared by the RayCluster and the clusters RayJob/RayCronJob create.

    Returns the worker groups split into ``gpu`` and ``cpu``.
    """
    head = spec["headGroupSpec"]
    # rayStartParams is map[string]string in the CRD: an unquoted 0 is rejected.
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must not run training"
    for group in [head, *spec["workerGroupSpecs"]]:
        for key, value in (group.get("rayStartParams") or {}).items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a string"
    head_containers = _containers(head)
    assert all(_gpus(c) == 0 for c in head_containers)
    ports = {p["containerPort"] for c in head_containers for p in c.get("ports", [])}
    assert 8265 in ports, "dashboard / Jobs API port"

    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), "groupName must be unique"
    for g in groups:
        assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]

    # The image must carry the Ray version the operator is told about.
    for group in [head, *groups]:
        for c in _containers(group):
            if c["image"].startswith("rayproject/ray:"):
                assert c["image"].split(":", 1)[1].startswith(spec["rayVersion"] + "-"), c["image"]

    split = {
        "gpu": [g for g in groups if any(_gpus(c) >= 1 for c in _containers(g))],
        "cpu": [g for g in groups if all(_gpus(c) == 0 for c in _containers(g))],
    }
    assert split["gpu"], "no worker group with an nvidia.com/gpu limit"
    assert split["cpu"], "no CPU-only worker group"
    for g in split["gpu"]:
        for c in _containers(g):
            requests = c["resources"].get("requests", {})
            if "nvidia.com/gpu" in requests:  # extended resources: requests must equal limits
                assert int(requests["nvidia.com/gpu"]) == _gpus(c)
    return split


def test_raycluster():
    rc = _one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    split = _check_ray_cluster_spec(spec)
    # Long-lived cluster: GPU pods come and go with demand.
    assert spec.get("enableInTreeAutoscaling") is True
    assert all(g["maxReplicas"] > g.get("minReplicas", 0) for g in split["gpu"])


def _entrypoint(job_spec: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    entry = job_spec["entrypoint"]
    assert entry.startswith("dhte run jobs/"), entry
    # A trailing --as-of=$(date ...) names the schedule tick (the shell expands it).
    tokens = shlex.split(entry.split(" --as-of=")[0])
    overrides = dict(t.split("=", 1) for t in tokens[3:])
    assert len(overrides) == len(tokens) - 3, f"overrides must be key=value: {tokens[3:]}"
    return REPO / tokens[2], overrides


def _check_ray_job_spec(job: dict[str, Any]) -> None:
    spec_file, overrides = _entrypoint(job)
    assert spec_file.is_file(), (
        f"the entrypoint names {spec_file.relative_to(REPO)}, which is not in the repo"
    )
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    if "runtimeEnvYAML" in job:
        assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)

    cluster = job["rayClusterSpec"]
    split = _check_ray_cluster_spec(cluster)
    if overrides.get("scaling.use_gpu", "false").lower() == "true":
        # One GPU per Ray Train worker: the job's cluster must be able to hold them all.
        key = "maxReplicas" if cluster.get("enableInTreeAutoscaling") else "replicas"
        slots = sum(g[key] * max(_gpus(c) for c in _containers(g)) for g in split["gpu"])
        assert int(overrides.get("scaling.num_workers", "2")) <= slots

    out = overrides.get("outputs.dir")
    assert out, "set outputs.dir to shared storage, the default 'runs' is node-local"
    if "://" not in out:  # a filesystem path: every pod must mount it
        assert out.startswith("/"), out
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for c in _containers(group):
                mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
                assert any(out == m or out.startswith(m.rstrip("/") + "/") for m in mounts), (
                    f"{group.get('groupName', 'head')}/{c['name']} does not mount {out}"
                )


def test_rayjob():
    rj = _one("RayJob")
    assert rj["apiVersion"] == "ray.io/v1"
    _check_ray_job_spec(rj["spec"])


def test_raycronjob():
    cj = _one("RayCronJob")
    assert cj["apiVersion"] == "ray.io/v1"
    schedule = cj["spec"]["schedule"]
    assert re.fullmatch(r"\S+( \S+){4}", schedule), f"not a 5-field cron schedule: {schedule!r}"
    _check_ray_job_spec(cj["spec"]["jobTemplate"])
    # Idempotent ticks: the run directory is named after the tick, and the spec retrains
    # against the registry's champion.
    entry = cj["spec"]["jobTemplate"]["entrypoint"]
    assert re.search(r"--as-of=\$\(date -u \+%F\)", entry), entry
    spec_file, _ = _entrypoint(cj["spec"]["jobTemplate"])
    spec = yaml.safe_load(spec_file.read_text())
    assert spec.get("registry") and spec.get("retrain"), f"{spec_file.name} is not a retrain"
    assert "{as_of}" in spec["data"]["path"], "the tick must select the day's data"


def test_claims_used_by_pods_are_defined_read_write_many():
    claims = {d["metadata"]["name"]: d["spec"] for d in _kuberay_docs("PersistentVolumeClaim")}
    specs = [_one("RayCluster")["spec"], _one("RayJob")["spec"]["rayClusterSpec"],
             _one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]]  # fmt: skip
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for spec in specs
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for v in group["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    for name in used:
        assert name in claims, f"claim {name} is not defined under cluster/kuberay"
        assert "ReadWriteMany" in claims[name]["accessModes"], name
