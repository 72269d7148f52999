"""The Kubernetes manifests in deploy/k8s and the examples in docs/deploy.md: validated offline
against the Kubernetes schemas (kubernetes-validate, strict), built with kustomize, and checked
for the properties the gateway relies on.

Tests that need kubernetes-validate, PyYAML or kubectl skip when they are missing, except under
CI=true, where a missing tool fails the test.
"""

from __future__ import annotations

import base64
import copy
import importlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.settings import ENV_PREFIX, Settings, SettingsError, parse_tokens

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
CLI = ROOT / "gateway" / "cli.py"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.33.0"  # the schemas kubernetes-validate checks against
NAMESPACE = "turnout"
SECRET_KEY = "TURNOUT_ADMIN_TOKENS"
DRAIN_MARGIN_S = 5  # at least this long for the final flush to Redis after the drain
FILES = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")

Resource = dict[str, Any]


def need(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not on PATH (it renders kustomizations offline)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_all(text: str) -> list[Resource]:
    return [doc for doc in need("yaml").safe_load_all(text) if doc]


def validate(resource: Resource) -> None:
    need("kubernetes_validate").validate(resource, K8S_VERSION, strict=True)


def kustomize(directory: Path) -> list[Resource]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return load_all(done.stdout)


@pytest.fixture(scope="module")
def resources() -> dict[str, Resource]:
    """``Kind/name`` -> resource, from every manifest file."""
    out: dict[str, Resource] = {}
    for name in FILES:
        for doc in load_all((K8S / name).read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def pod_templates(resources: dict[str, Resource]) -> Iterator[tuple[str, Resource]]:
    for key, res in resources.items():
        if res["kind"] in ("Deployment", "StatefulSet"):
            yield key, res["spec"]["template"]


def gateway(resources: dict[str, Resource]) -> tuple[Resource, Resource]:
    """The gateway's pod spec and its container."""
    spec = resources["Deployment/turnout"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def dockerfile_env(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text())
    assert match, f"the Dockerfile sets no {name}"
    return match.group(1)


# -- schemas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    docs = load_all((K8S / name).read_text())
    assert docs, f"{name} holds no resource"
    for doc in docs:
        validate(doc)


def test_strict_validation_refuses_a_misspelt_field(resources: dict[str, Resource]) -> None:
    kv = need("kubernetes_validate")
    broken = copy.deepcopy(resources["Deployment/turnout"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinessProbes"):
        validate(broken)


def test_kustomization_lists_every_manifest_file() -> None:
    kustomization = need("yaml").safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == FILES


def test_kustomize_builds_everything_into_the_namespace(resources: dict[str, Resource]) -> None:
    built = kustomize(K8S)
    assert sorted(f"{r['kind']}/{r['metadata']['name']}" for r in built) == sorted(resources)
    for res in built:
        validate(res)
        if res["kind"] != "Namespace":
            assert res["metadata"]["namespace"] == NAMESPACE, res["metadata"]["name"]


# -- the gateway's pod ---------------------------------------------------------------------------
def test_probes_use_the_protocol_health_endpoints(resources: dict[str, Resource]) -> None:
    _, container = gateway(resources)
    (port,) = container["ports"]
    assert port["name"] == "http"
    expected = {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # The startup budget covers a cold kernel compile and model load (tens of seconds).
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_covers_prestop_and_the_gateways_drain(
    resources: dict[str, Resource],
) -> None:
    drain = re.search(r'"timeout_graceful_shutdown":\s*(\d+)', CLI.read_text())
    assert drain, "gateway/cli.py no longer sets timeout_graceful_shutdown"
    spec, container = gateway(resources)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    assert pause >= 1
    assert spec["terminationGracePeriodSeconds"] >= pause + int(drain.group(1)) + DRAIN_MARGIN_S


def test_pods_run_as_non_root_with_nothing_extra(resources: dict[str, Resource]) -> None:
    for key, template in pod_templates(resources):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True, key
        assert pod["runAsUser"] > 0, key
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, key
        assert template["spec"]["automountServiceAccountToken"] is False, key
        for container in template["spec"]["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, key
            assert ctx["readOnlyRootFilesystem"] is True, key
            assert ctx["capabilities"] == {"drop": ["ALL"]}, key
    uid = re.search(r"useradd[^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert uid, "the Dockerfile creates no user with a fixed uid"
    spec, _ = gateway(resources)
    assert spec["securityContext"]["runAsUser"] == int(uid.group(1))
    namespace = resources[f"Namespace/{NAMESPACE}"]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_container_requests_and_limits_cpu_and_memory(
    resources: dict[str, Resource],
) -> None:
    for key, template in pod_templates(resources):
        for container in template["spec"]["containers"]:
            res = container["resources"]
            for kind in ("cpu", "memory"):
                assert kind in res["requests"] and kind in res["limits"], (key, kind)
            assert cpu_cores(res["limits"]["cpu"]) >= cpu_cores(res["requests"]["cpu"]), key


def test_cpu_request_covers_the_onnxruntime_threads(resources: dict[str, Resource]) -> None:
    data = resources["ConfigMap/turnout-config"]["data"]
    threads = (
        int(data["TURNOUT_WORKERS"])
        * int(data["TURNOUT_EXECUTION_THREADS"])
        * int(data["TURNOUT_INTRA_OP_THREADS"])
    )
    _, container = gateway(resources)
    assert cpu_cores(container["resources"]["requests"]["cpu"]) >= threads


def test_admin_tokens_come_from_the_secret_by_reference(resources: dict[str, Resource]) -> None:
    secret = resources["Secret/turnout-admin-tokens"]
    assert SECRET_KEY in secret["stringData"]
    assert SECRET_KEY not in resources["ConfigMap/turnout-config"]["data"]
    _, container = gateway(resources)
    (entry,) = [e for e in container["env"] if e["name"] == SECRET_KEY]
    assert "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("turnout-admin-tokens", SECRET_KEY)


def test_the_secret_placeholder_is_refused_by_the_gateway(resources: dict[str, Resource]) -> None:
    placeholder = resources["Secret/turnout-admin-tokens"]["stringData"][SECRET_KEY]
    with pytest.raises(SettingsError, match="NAME=TOKEN"):
        parse_tokens(SECRET_KEY, placeholder)


def test_configmap_holds_known_settings_that_the_gateway_accepts(
    resources: dict[str, Resource],
) -> None:
    data = resources["ConfigMap/turnout-config"]["data"]
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert set(data) <= known, f"unknown settings: {sorted(set(data) - known)}"
    settings = Settings.from_env({**data, SECRET_KEY: "ops=a-real-token-123"})
    # One worker per pod: the repository API and /metrics then reach the whole pod.
    assert settings.workers == 1
    spec, container = gateway(resources)
    assert container["ports"][0]["containerPort"] == settings.port
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == str(settings.model_repository)
    assert mounts["models"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    pvc = resources[f"PersistentVolumeClaim/{claim['claimName']}"]
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    redis = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings.redis_url or "")
    assert redis, settings.redis_url
    service = resources[f"Service/{redis.group(1)}"]
    assert service["spec"]["ports"][0]["port"] == int(redis.group(2))


def test_service_links_are_off(resources: dict[str, Resource]) -> None:
    # The kubelet would set TURNOUT_PORT=tcp://... for the Service named turnout.
    assert any(key.startswith("TURNOUT_") for key in resources["ConfigMap/turnout-config"]["data"])
    for key, template in pod_templates(resources):
        assert template["spec"]["enableServiceLinks"] is False, key


def test_caches_and_tmp_are_writable_volumes(resources: dict[str, Resource]) -> None:
    spec, container = gateway(resources)
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for name in ("NUMBA_CACHE_DIR", "TURNOUT_CACHE_DIR"):
        assert env[name] == dockerfile_env(name)
        assert "emptyDir" in volumes[mounts[str(Path(env[name]).parent)]], name
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_prometheus_scrapes_every_pod(resources: dict[str, Resource]) -> None:
    annotations = resources["Deployment/turnout"]["spec"]["template"]["metadata"]["annotations"]
    _, container = gateway(resources)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


# -- fleet ---------------------------------------------------------------------------------------
def test_selectors_reach_the_pods_they_mean(resources: dict[str, Resource]) -> None:
    def selects(selector: dict[str, str], template: Resource) -> bool:
        labels: dict[str, str] = template["metadata"]["labels"]
        return selector.items() <= labels.items()

    deployment = resources["Deployment/turnout"]
    pods = deployment["spec"]["template"]
    redis = resources["StatefulSet/turnout-redis"]
    redis_pods = redis["spec"]["template"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pods)
    assert selects(resources["Service/turnout"]["spec"]["selector"], pods)
    assert selects(
        resources["PodDisruptionBudget/turnout"]["spec"]["selector"]["matchLabels"], pods
    )
    assert selects(resources["NetworkPolicy/turnout"]["spec"]["podSelector"]["matchLabels"], pods)
    for constraint in pods["spec"]["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"], pods)
    target = resources["HorizontalPodAutoscaler/turnout"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "turnout")
    assert selects(redis["spec"]["selector"]["matchLabels"], redis_pods)
    assert selects(resources["Service/turnout-redis"]["spec"]["selector"], redis_pods)
    assert f"Service/{redis['spec']['serviceName']}" in resources
    policy = resources["NetworkPolicy/turnout-redis"]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], redis_pods)
    (rule,) = policy["ingress"]
    assert [selects(f["podSelector"]["matchLabels"], pods) for f in rule["from"]] == [True]
    assert not selects(policy["podSelector"]["matchLabels"], pods)


def test_replicas_belong_to_the_hpa_and_disruptions_are_bounded(
    resources: dict[str, Resource],
) -> None:
    deployment = resources["Deployment/turnout"]["spec"]
    assert "replicas" not in deployment  # `kubectl apply` would reset the HPA's count
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = resources["HorizontalPodAutoscaler/turnout"]["spec"]
    assert hpa["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    pdb = resources["PodDisruptionBudget/turnout"]["spec"]
    assert pdb["maxUnavailable"] == 1
    hosts = [
        c
        for c in deployment["template"]["spec"]["topologySpreadConstraints"]
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert [c["maxSkew"] for c in hosts] == [1]


def test_redis_persists_what_it_holds(resources: dict[str, Resource]) -> None:
    redis = resources["StatefulSet/turnout-redis"]["spec"]
    (container,) = redis["template"]["spec"]["containers"]
    args = container["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    (claim,) = redis["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == options["--dir"]


# -- docs/deploy.md ------------------------------------------------------------------------------
def doc_blocks() -> list[Resource]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return [doc for block in blocks for doc in load_all(block)]


def test_the_docs_manifests_validate() -> None:
    docs = [d for d in doc_blocks() if d["kind"] != "Kustomization"]
    assert sorted(d["kind"] for d in docs) == ["Ingress", "Pod"]
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_the_docs_overlay_replaces_the_placeholder_token(tmp_path: Path) -> None:
    (overlay,) = [d for d in doc_blocks() if d["kind"] == "Kustomization"]
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    prod = tmp_path / "deploy" / "overlays" / "prod"
    prod.mkdir(parents=True)
    (prod / "kustomization.yaml").write_text(need("yaml").safe_dump(overlay))
    tokens = "ops=0123456789abcdef,deployer=fedcba9876543210"
    (prod / "admin-tokens.env").write_text(f"{SECRET_KEY}={tokens}\n")
    built = {f"{r['kind']}/{r['metadata']['name']}": r for r in kustomize(prod)}
    secret = built["Secret/turnout-admin-tokens"]
    assert "stringData" not in secret
    assert base64.b64decode(secret["data"][SECRET_KEY]).decode() == tokens
    assert parse_tokens(SECRET_KEY, tokens).keys() == {"ops", "deployer"}
    (container,) = built["Deployment/turnout"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/turnout:0.1.0"
