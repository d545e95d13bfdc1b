"""The Kubernetes manifests in deploy/k8s/: schema-valid, consistent with each other, and the
router's HAProxy configuration the same as deploy/haproxy/haproxy.cfg apart from how replicas are
found.

Everything runs offline: the schemas come with the kubernetes-validate package and HAProxy's own
config check needs no network.
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO

K8S = REPO / "deploy" / "k8s"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
CONFIG_KEY = "haproxy.cfg"
# Custom resources: no schema of them ships with Kubernetes (checked by hand below).
CUSTOM_KINDS = {"InferencePool"}


def load_docs() -> list[dict]:
    return [
        d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d
    ]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    """Every object of deploy/k8s/, by (kind, name)."""
    docs = load_docs()
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "two objects share a kind and a name"
    return by_key


@pytest.fixture(scope="module")
def k8s_cfg(objects) -> str:
    """The haproxy.cfg the router pod runs."""
    return objects["ConfigMap", "plm-haproxy"]["data"][CONFIG_KEY]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def only_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def section(cfg: str, header: str) -> list[str]:
    """The stripped, non-comment lines of one haproxy.cfg section (`backend plm`, ...)."""
    lines, inside = [], False
    for line in cfg.splitlines():
        if line and not line[0].isspace():
            inside = line.strip() == header
        elif inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    assert lines, f"no section {header!r}"
    return lines


def directive(lines: list[str], keyword: str) -> list[str]:
    (found,) = [line.split() for line in lines if line.split()[0] == keyword]
    return found


# --- (a) schemas ----------------------------------------------------------------------------------


def test_manifests_validate_against_the_kubernetes_schemas():
    """Every built-in object (not the InferencePool custom resource) is valid for a recent
    Kubernetes, strictly: a misspelt or misplaced field fails as well as a wrong type."""
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    version = kv.latest_version()
    checked = []
    for doc in load_docs():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            name = f"{doc['kind']} {doc['metadata']['name']}"
            pytest.fail(f"{name}, Kubernetes {version}: {where}: {error.message}")
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= set(checked)


# --- (b) the ConfigMap's haproxy.cfg --------------------------------------------------------------


def code_lines(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_configmap_config_differs_from_haproxy_cfg_only_where_replicas_are_found(k8s_cfg):
    """The router runs deploy/haproxy/haproxy.cfg with two changes and nothing else: the
    `server-template` line (and its comment) points at the headless Service, and the `resolvers`
    section reads the pod's resolv.conf instead of naming Docker's DNS. So its settings cannot
    drift from the file compose and tests/test_router.py run."""
    original = HAPROXY_CFG.read_text().splitlines()
    k8s = k8s_cfg.splitlines()
    matcher = difflib.SequenceMatcher(a=original, b=k8s, autojunk=False)
    hunks = [
        (original[i1:i2], k8s[j1:j2])
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]
    diff = "\n".join(difflib.unified_diff(original, k8s, "haproxy.cfg", "router.yaml", lineterm=""))
    assert len(hunks) == 2, f"copy changes of haproxy.cfg into deploy/k8s/router.yaml:\n{diff}"
    (old_template, new_template), (old_resolvers, new_resolvers) = hunks
    (old_server,) = code_lines(old_template)
    (new_server,) = code_lines(new_template)
    assert new_server == (
        "server-template plm 16 plm-serve-headless.default.svc.cluster.local:8000"
        " resolvers k8s init-addr none"
    ), diff
    # the same template but for its slot count, DNS name and resolvers section (words 2, 3, 5)
    old_words, new_words = old_server.split(), new_server.split()
    assert old_words[0] == "server-template" and len(old_words) == len(new_words), diff
    assert [w for i, w in enumerate(old_words) if i not in (2, 3, 5)] == [
        w for i, w in enumerate(new_words) if i not in (2, 3, 5)
    ], diff
    old_section = code_lines(old_resolvers)
    assert old_section[0] == f"resolvers {old_words[5]}", diff
    assert old_section[1:] and all(line.startswith("nameserver ") for line in old_section[1:]), diff
    assert code_lines(new_resolvers) == ["resolvers k8s", "parse-resolv-conf"], diff
    assert section(k8s_cfg, "resolvers k8s") == ["parse-resolv-conf", "hold valid 5s"]


# --- (c) the router's objects agree ---------------------------------------------------------------


def test_router_deployment_runs_the_configmap(objects):
    """The HAProxy container reads its config from the path the ConfigMap is mounted at, and runs
    as a single, non-root replica (see router.yaml for why one)."""
    router = objects["Deployment", "plm-router"]
    pod = router["spec"]["template"]["spec"]
    container = only_container(router)
    assert container["image"].startswith("haproxy:2.6")
    args = container["args"]
    assert args[0] == "haproxy"  # the image's entrypoint adds -W -db to exactly this
    config_path = args[args.index("-f") + 1]
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if m["mountPath"] in (config_path, str(Path(config_path).parent))
    ]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "plm-haproxy"
    key = mount.get("subPath") if mount["mountPath"] == config_path else Path(config_path).name
    assert key == CONFIG_KEY
    assert router["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 99
    assert router["spec"]["selector"]["matchLabels"].items() <= pod_labels(router).items()


def test_router_ports_probes_and_service_match_haproxy_cfg(objects, k8s_cfg):
    """The container ports are HAProxy's `bind` ports, the probes hit the stats frontend's page,
    and the plm-router Service selects the router pods (and no plm-serve pod) on those ports."""
    router = objects["Deployment", "plm-router"]
    container = only_container(router)
    ports = container_ports(container)
    binds = {
        name: int(directive(section(k8s_cfg, f"frontend {frontend}"), "bind")[1].lstrip(":"))
        for name, frontend in (("http", "openai"), ("stats", "stats"))
    }
    assert ports == binds
    stats_uris = [
        line.split()[2]
        for line in section(k8s_cfg, "frontend stats")
        if line.startswith("stats uri ")
    ]
    readiness = container["readinessProbe"]["httpGet"]
    assert ports[readiness["port"]] == binds["stats"] and readiness["path"] in stats_uris
    assert ports[container["livenessProbe"]["tcpSocket"]["port"]] == binds["stats"]
    service = objects["Service", "plm-router"]["spec"]
    assert service["selector"].items() <= pod_labels(router).items()
    plm_serve = pod_labels(objects["Deployment", "plm-serve"])
    assert not service["selector"].items() <= plm_serve.items(), "it would reach plm-serve pods"
    targets = {p["name"]: p["targetPort"] for p in service["ports"]}
    assert targets == {"http": "http", "stats": "stats"}


def test_headless_service_lists_the_plm_serve_pods_haproxy_resolves(objects, k8s_cfg):
    """The headless Service selects the plm-serve pods (as service.yaml does), publishes ready pods
    only, on their container port, under the name and port of the `server-template` line."""
    headless = objects["Service", "plm-serve-headless"]
    spec = headless["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is False
    plm_serve = objects["Deployment", "plm-serve"]
    assert spec["selector"].items() <= pod_labels(plm_serve).items()
    assert spec["selector"] == objects["Service", "plm-serve"]["spec"]["selector"]
    (port,) = spec["ports"]
    assert container_ports(only_container(plm_serve))[port["targetPort"]] == port["port"]
    template = directive(section(k8s_cfg, "backend plm"), "server-template")
    host, _, server_port = template[3].rpartition(":")
    assert host.split(".")[:3] == [headless["metadata"]["name"], "default", "svc"]
    assert int(server_port) == port["port"]
    assert template[template.index("resolvers") + 1] == "k8s"


# --- (d) HAProxy's own check ----------------------------------------------------------------------


def test_configmap_config_passes_haproxy_check(k8s_cfg, tmp_path):
    """`haproxy -c` accepts the router's config (the HAProxy here is Debian's 2.6, the version the
    router runs; a keyword of a later version would fail)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed here (apt-get install haproxy)")
    config = tmp_path / CONFIG_KEY
    config.write_text(k8s_cfg)
    done = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- (e) the optional InferencePool ---------------------------------------------------------------


QUEUE, RUNNING, KV = "num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"
# What each EPP flag / engineConfigs field must point at (vLLM's metric of the same meaning).
EPP_FLAGS = {
    "total-queued-requests-metric": QUEUE,
    "total-running-requests-metric": RUNNING,
    "kv-cache-usage-percentage-metric": KV,
    "lora-info-metric": None,
    "cache-info-metric": None,
}
ENGINE_FIELDS = {
    "queuedRequestsSpec": QUEUE,
    "runningRequestsSpec": RUNNING,
    "kvUsageSpec": KV,
    "loraSpec": None,
    "cacheInfoSpec": None,
}


def server_metric_names() -> set[str]:
    return set(re.findall(r'"(plm:[a-z_]+)"', (REPO / "server" / "metrics.py").read_text()))


def plm_name(value: str) -> str | None:
    return value.removeprefix("plm:") if value else None


def test_inference_pool_selects_the_plm_serve_pods(objects):
    """The InferencePool has the fields its v1 CRD requires, and targets the plm-serve pods on
    their container port."""
    pool = objects["InferencePool", "plm-serve"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    labels = spec["selector"]["matchLabels"]
    plm_serve = objects["Deployment", "plm-serve"]
    assert labels and labels.items() <= pod_labels(plm_serve).items()
    assert set(spec["selector"]) == {"matchLabels"}, "v1 selectors take matchLabels only"
    numbers = [p["number"] for p in spec["targetPorts"]]
    assert 1 <= len(numbers) <= 8 and len(set(numbers)) == len(numbers)
    assert numbers == [container_ports(only_container(plm_serve))["http"]]
    ref = spec["endpointPickerRef"]
    assert ref["name"] and ref.get("kind", "Service") == "Service" and ref["port"]["number"]
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


def test_inference_pool_epp_metric_names_exist_in_the_server():
    """The EPP settings in inference-pool.yaml's comments (flags and engineConfigs alike) map each
    metric to plm-serve's metric of the same meaning, and that metric exists in server/metrics.py;
    the metrics plm-serve lacks are turned off."""
    text = (K8S / "inference-pool.yaml").read_text()
    flags = dict(re.findall(r"^#\s+- --([a-z-]+-metric)=(\S*)$", text, re.M))
    fields = {k: v for k, v in re.findall(r'^#\s+(\w+Spec): "([^"]*)"$', text, re.M)}
    assert {k: plm_name(v) for k, v in flags.items()} == EPP_FLAGS
    assert {k: plm_name(v) for k, v in fields.items()} == ENGINE_FIELDS
    mapped = {v for v in (*flags.values(), *fields.values()) if v}
    missing = mapped - server_metric_names()
    assert mapped and not missing, f"not in server/metrics.py: {sorted(missing)}"
