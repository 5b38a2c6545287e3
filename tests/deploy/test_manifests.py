"""The Kubernetes manifests: rendered with ``kubectl kustomize``, validated offline against the
Kubernetes schemas (``kubernetes-validate --strict``), and checked for the policies that keep
the deployment safe and working (Pod Security ``restricted``, probes, resources, autoscaling,
disruption budgets, network policies, certificates, option names the servers understand).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api import config as api_config
from api.pb import imagescaler_pb2
from auth.tenants import parse_tenants
from processor import config as processor_config
from processor.pb import processor_pb2

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
GKE = MANIFESTS / "overlays" / "gke"
# Oldest Kubernetes we deploy to (GKE's extended channel) and the newest schemas available.
K8S_VERSIONS = ("1.31", "1.37")
# Custom resources: no schema in kubernetes-validate; checked field by field below.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
}
# Created by the operator (docs/deployment.md), never by the manifests.
OUT_OF_BAND_SECRETS = {"imagescaler-jwks", "imagescaler-redis"}
# ClusterIssuers the operator creates (docs/deployment.md); overlays may name them.
OUT_OF_BAND_CLUSTER_ISSUERS = {"letsencrypt"}
OUR_IMAGE = "imagescaler"
Obj = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not installed, so the manifests cannot be rendered. Install it (it "
            "bundles kustomize); the test command must provide it."
        )
    return found


def render(directory: Path) -> list[Obj]:
    """``kubectl kustomize DIR`` as a list of objects; fails with kustomize's own message."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=["base", "gke"])
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(BASE if request.param == "base" else GKE)


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(BASE)


@pytest.fixture(scope="module")
def gke() -> list[Obj]:
    return render(GKE)


# --- helpers -----------------------------------------------------------------------------


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert found, f"no {kind} {name!r} in the render"
    return found[0]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) for every Deployment, StatefulSet, DaemonSet, Job."""
    for o in objs:
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield o, o["spec"]["template"]["spec"]


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_labels(objs: list[Obj]) -> dict[str, dict[str, str]]:
    """Pod template labels by workload name."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] == "Deployment"
    }


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def selected(objs: list[Obj], selector: Obj) -> set[str]:
    return {name for name, labels in pod_labels(objs).items() if selects(selector, labels)}


def container(objs: list[Obj], deployment: str) -> Obj:
    return named(objs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def flags(c: Obj) -> dict[str, str]:
    """``--name=value`` arguments as a dict (our manifests always use the = form)."""
    out = {}
    for arg in c.get("args", []):
        assert arg.startswith("--") and "=" in arg, f"write args as --flag=value: {arg!r}"
        name, _, value = arg[2:].partition("=")
        out[name] = value
    return out


def port_of(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


def cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def is_ours(c: Obj) -> bool:
    return c["image"].rpartition(":")[0].endswith(OUR_IMAGE)


def service_name(descriptor: Any, service: str) -> str:
    return str(descriptor.services_by_name[service].full_name)


# --- schema validation -------------------------------------------------------------------


def test_every_object_is_valid_for_kubernetes(rendered: list[Obj]) -> None:
    """Strict schema validation catches misspelt or misplaced fields, which apply ignores."""
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(map(str, exc.path))
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                    f"{version} at {where}: {exc.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(exc.message)


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    """Guard on the guard: strict mode really refuses fields Kubernetes does not know."""
    probe = {"grpc": {"port": 50051}, "tcpSocketz": {"port": 1}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "x", "image": "x:1", "readinessProbe": probe}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_only_known_custom_resources(rendered: list[Obj]) -> None:
    builtin_groups = ("v1", "apps/", "autoscaling/", "policy/", "networking.k8s.io/")
    for obj in rendered:
        known = (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS
        assert known or obj["apiVersion"].startswith(builtin_groups), obj["kind"]


# --- namespace ---------------------------------------------------------------------------


def test_namespace_enforces_restricted_pod_security(rendered: list[Obj]) -> None:
    (namespace,) = of_kind(rendered, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    name = namespace["metadata"]["name"]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == name, obj["metadata"]["name"]


def test_base_is_namespace_agnostic(tmp_path: Path) -> None:
    """An overlay choosing another namespace moves everything; nothing names the old one."""
    relative = os.path.relpath(BASE, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"namespace: elsewhere\nresources: [{relative}]\n")
    objs = render(tmp_path)
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objs} == {"elsewhere"}
    text = yaml.safe_dump_all(objs)
    assert ".imagescaler.svc" not in text and "namespace: imagescaler" not in text


# --- Pod Security Standards "restricted" ---------------------------------------------------


def test_pods_meet_restricted_pod_security(rendered: list[Obj]) -> None:
    for workload, spec in pod_specs(rendered):
        name = workload["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name}: {key}"
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert not sc.get("privileged"), c["name"]


def test_our_containers_run_as_the_image_user_with_a_writable_tmp(rendered: list[Obj]) -> None:
    """The image's USER is 10001; a read-only root needs an emptyDir at /tmp (HOME)."""
    for workload, spec in pod_specs(rendered):
        ours = [c for c in containers(spec) if is_ours(c)]
        if not ours:
            continue
        assert spec["securityContext"]["runAsUser"] == 10001, workload["metadata"]["name"]
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in ours:
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, c["name"]


def test_service_account_tokens_only_where_workload_identity_needs_them(
    rendered: list[Obj],
) -> None:
    for workload, spec in pod_specs(rendered):
        env = {e["name"] for c in containers(spec) for e in c.get("env", [])}
        needs_google = "IMAGESCALER_RESULT_STORE" in env
        assert spec["automountServiceAccountToken"] is needs_google, workload["metadata"]["name"]
    for account in of_kind(rendered, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False, account["metadata"]["name"]


# --- containers ----------------------------------------------------------------------------


def test_images_are_pinned(rendered: list[Obj]) -> None:
    for _, spec in pod_specs(rendered):
        for c in containers(spec):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag not in {"", "latest"}, image
            assert c.get("imagePullPolicy") != "Always" or "@sha256:" in image


def test_commands_are_our_console_scripts_with_known_options(rendered: list[Obj]) -> None:
    """A misspelt flag or env var would only show up as a crash-looping pod."""
    known = {
        "imagescaler-api": api_config.build_options().parser,
        "imagescaler-processor": processor_config.build_options().parser,
    }
    for _, spec in pod_specs(rendered):
        for c in filter(is_ours, containers(spec)):
            parser = known[c["command"][0]]
            options = {s for a in parser._actions for s in a.option_strings}
            for flag in flags(c):
                assert f"--{flag}" in options, f"{c['command'][0]}: unknown --{flag}"
            for env in c.get("env", []):
                if env["name"].startswith("IMAGESCALER_"):
                    flag = "--" + env["name"].removeprefix("IMAGESCALER_").lower().replace("_", "-")
                    assert flag in options, f"{c['command'][0]}: unknown {env['name']}"


def test_resources_are_set_for_every_container(rendered: list[Obj]) -> None:
    for _, spec in pod_specs(rendered):
        for c in containers(spec):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
            assert {"cpu", "memory"} <= set(res["limits"]), c["name"]
            assert memory_mib(res["requests"]["memory"]) <= memory_mib(res["limits"]["memory"])
            assert cpu(res["requests"]["cpu"]) <= cpu(res["limits"]["cpu"])


def test_processor_gets_a_cpu_per_worker_and_memory_per_image(rendered: list[Obj]) -> None:
    c = container(rendered, "processor")
    workers = int(flags(c)["workers"])
    requests = c["resources"]["requests"]
    assert cpu(requests["cpu"]) >= workers
    assert memory_mib(c["resources"]["limits"]["memory"]) >= 100 + 20 * workers


def test_probes_are_native_grpc_health_checks(rendered: list[Obj]) -> None:
    api = container(rendered, "api")
    assert port_of(flags(api)["listen"]) == 50051
    api_probe = port_of(flags(api)["probe-listen"])
    # The public listener speaks TLS, which the kubelet's gRPC probes cannot.
    assert api_probe != port_of(flags(api)["listen"])
    assert api["readinessProbe"]["grpc"] == {
        "port": api_probe,
        "service": service_name(imagescaler_pb2.DESCRIPTOR, "ImageScaler"),
    }
    assert api["livenessProbe"]["grpc"]["port"] == api_probe

    processor = container(rendered, "processor")
    probe_port = port_of(flags(processor)["probe-listen"])
    # The mTLS port would refuse the kubelet: the probes must use the plaintext probe port.
    assert probe_port != port_of(flags(processor)["listen"])
    assert processor["readinessProbe"]["grpc"] == {
        "port": probe_port,
        "service": service_name(processor_pb2.DESCRIPTOR, "Processor"),
    }
    assert processor["livenessProbe"]["grpc"]["port"] == probe_port


def test_every_container_has_readiness_and_liveness_probes(rendered: list[Obj]) -> None:
    for _, spec in pod_specs(rendered):
        for c in spec["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, c["name"]


def test_termination_grace_outlasts_the_drain(rendered: list[Obj]) -> None:
    for name in ("api", "processor"):
        spec = named(rendered, "Deployment", name)["spec"]["template"]["spec"]
        c = spec["containers"][0]
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        drain = float(flags(c)["grace"])
        assert spec["terminationGracePeriodSeconds"] > pre_stop + drain, name


def test_ports(rendered: list[Obj]) -> None:
    api = container(rendered, "api")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"grpc": 50051, "probe": 50054, "metrics": 5001}
    assert int(flags(api)["metrics-port"]) == 5001
    assert port_of(flags(api)["probe-listen"]) == 50054
    processor = container(rendered, "processor")
    ports = {p["name"]: p["containerPort"] for p in processor["ports"]}
    assert ports["grpc"] == port_of(flags(processor)["listen"]) == 50052
    assert ports["metrics"] == int(flags(processor)["metrics-port"])
    assert ports["probe"] == port_of(flags(processor)["probe-listen"])


# --- services, balancing, certificates -------------------------------------------------------


def test_services_select_existing_pods_and_ports(rendered: list[Obj]) -> None:
    for svc in of_kind(rendered, "Service"):
        pods = selected(rendered, {"matchLabels": svc["spec"]["selector"]})
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for pod in pods:
            c = container(rendered, pod)
            names = {p["name"] for p in c["ports"]}
            numbers = {p["containerPort"] for p in c["ports"]}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in names | numbers, (svc["metadata"]["name"], port)


def test_public_service_exposes_only_the_grpc_port(rendered: list[Obj]) -> None:
    svc = named(rendered, "Service", "api")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in svc["spec"]["ports"]] == [50051]


def test_api_balances_over_a_headless_processor_service(rendered: list[Obj]) -> None:
    """dns:/// on a headless Service gives the API every pod; round_robin spreads the calls."""
    svc = named(rendered, "Service", "processor")
    assert svc["spec"]["clusterIP"] == "None"
    api = container(rendered, "api")
    target = flags(api)["processor"]
    pattern = r"dns:///([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:(\d+)"
    match = re.fullmatch(pattern, target)
    assert match, target
    assert match.group(1) == svc["metadata"]["name"]
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")["port"]
    assert int(match.group(2)) == grpc_port
    env = {e["name"]: e for e in api["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_mtls_certificates_match_what_each_side_checks(rendered: list[Obj]) -> None:
    certs = {c["spec"]["secretName"]: c["spec"] for c in of_kind(rendered, "Certificate")}
    issuers = {i["metadata"]["name"]: i["spec"] for i in of_kind(rendered, "Issuer")}
    for spec in certs.values():
        if spec["issuerRef"]["kind"] == "ClusterIssuer":
            assert spec["issuerRef"]["name"] in OUT_OF_BAND_CLUSTER_ISSUERS
        else:
            assert spec["issuerRef"]["name"] in issuers
    for issuer in issuers.values():
        if "ca" in issuer:
            assert certs[issuer["ca"]["secretName"]]["isCA"] is True

    api, processor = container(rendered, "api"), container(rendered, "processor")
    server = certs[secret_mounted_at(rendered, "processor", flags(processor)["tls-cert"])]
    client = certs[secret_mounted_at(rendered, "api", flags(api)["processor-cert"])]
    assert flags(api)["processor-server-name"] in server["dnsNames"]
    assert "server auth" in server["usages"]
    assert flags(processor)["allow-client"] in [client["commonName"], *client["dnsNames"]]
    assert "client auth" in client["usages"]
    # Both leaves come from the same CA, which is what each side trusts (ca.crt).
    assert server["issuerRef"] == client["issuerRef"]
    assert flags(api)["processor-ca"].endswith("/ca.crt")
    assert flags(processor)["tls-client-ca"].endswith("/ca.crt")


def test_public_listener_serves_a_mounted_certificate(rendered: list[Obj]) -> None:
    """TLS at the pod: --tls-cert/--tls-key are the tls.crt/tls.key of an issued Secret."""
    api = flags(container(rendered, "api"))
    secret = secret_mounted_at(rendered, "api", api["tls-cert"])
    assert secret_mounted_at(rendered, "api", api["tls-key"]) == secret
    assert api["tls-cert"].endswith("/tls.crt") and api["tls-key"].endswith("/tls.key")
    assert os.path.dirname(api["tls-cert"]) == os.path.dirname(api["tls-key"])
    certs = {c["spec"]["secretName"]: c["spec"] for c in of_kind(rendered, "Certificate")}
    spec = certs[secret]
    assert "server auth" in spec["usages"]
    # The name clients dial; a public issuer refuses single-label names such as "api".
    assert spec["dnsNames"] and all("." in name for name in spec["dnsNames"])
    # Not the client certificate the API presents to the processor.
    assert secret != secret_mounted_at(rendered, "api", api["processor-cert"])


def test_probe_ports_are_opened_by_no_network_policy(rendered: list[Obj]) -> None:
    """The kubelet's probes bypass NetworkPolicy in the CNIs we target; nobody else needs them."""
    for pod in ("api", "processor"):
        assert ingress_sources(rendered, pod, "probe") == [], pod


def test_public_certificate_issuer(base: list[Obj], gke: list[Obj]) -> None:
    """The base uses its internal CA; GKE uses a public ACME ClusterIssuer (client --tls)."""
    internal = named(base, "Certificate", "api-tls")["spec"]["issuerRef"]
    assert internal["kind"] == "Issuer" and "ca" in named(base, "Issuer", internal["name"])["spec"]
    public = named(gke, "Certificate", "api-tls")["spec"]["issuerRef"]
    assert public == {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "letsencrypt"}
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert "kind: ClusterIssuer" in text and "name: letsencrypt" in text


def secret_mounted_at(objs: list[Obj], deployment: str, path: str) -> str:
    """The Secret whose directory mount holds ``path``."""
    spec = named(objs, "Deployment", deployment)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in spec["containers"][0]["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return str(volumes[mount["name"]]["secret"]["secretName"])
    raise AssertionError(f"{path} is not in a mounted volume")


def test_files_come_from_directory_mounts_that_rotate(rendered: list[Obj]) -> None:
    """subPath mounts never see updates; every file option must sit in a mounted directory."""
    file_flags = {
        "jwks",
        "tenants",
        "tls-cert",
        "tls-key",
        "tls-client-ca",
        "processor-ca",
        "processor-cert",
        "processor-key",
    }
    for workload, spec in pod_specs(rendered):
        for c in filter(is_ours, containers(spec)):
            mounts = c.get("volumeMounts", [])
            assert not any("subPath" in m or "subPathExpr" in m for m in mounts), c["name"]
            for flag, path in flags(c).items():
                if flag in file_flags:
                    assert any(path.startswith(m["mountPath"] + "/") for m in mounts), path
        del workload


def test_referenced_secrets_and_config_maps_exist(rendered: list[Obj]) -> None:
    issued = {c["spec"]["secretName"] for c in of_kind(rendered, "Certificate")}
    config_maps = {c["metadata"]["name"] for c in of_kind(rendered, "ConfigMap")}
    for _, spec in pod_specs(rendered):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in issued | OUT_OF_BAND_SECRETS
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
        for c in containers(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in OUT_OF_BAND_SECRETS, ref


def test_out_of_band_secrets_are_documented() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for secret in OUT_OF_BAND_SECRETS:
        assert f"create secret generic {secret}" in text, secret


def test_tenant_registry_is_valid() -> None:
    tenants = parse_tenants((BASE / "config" / "tenants.yaml").read_bytes())
    assert tenants


# --- autoscaling and disruption -------------------------------------------------------------


def test_autoscalers_scale_up_fast_and_down_slowly(rendered: list[Obj]) -> None:
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(rendered, "HorizontalPodAutoscaler")
    }
    for name in ("api", "processor"):
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] >= 2
        assert named(rendered, "Deployment", name)["spec"]["replicas"] >= 2
        up, down = hpa["spec"]["behavior"]["scaleUp"], hpa["spec"]["behavior"]["scaleDown"]
        assert up["stabilizationWindowSeconds"] <= 30
        assert down["stabilizationWindowSeconds"] >= 300
        assert all(p["periodSeconds"] >= 60 for p in down["policies"])


def test_disruption_budgets_match_their_deployments(rendered: list[Obj]) -> None:
    budgets = of_kind(rendered, "PodDisruptionBudget")
    for name in ("api", "processor"):
        matching = [b for b in budgets if selected(rendered, b["spec"]["selector"]) == {name}]
        assert len(matching) == 1, name
        spec = matching[0]["spec"]
        assert spec.get("maxUnavailable") == 1 or "minAvailable" in spec


def test_replicas_spread_over_zones_and_nodes(rendered: list[Obj]) -> None:
    for name in ("api", "processor"):
        spec = named(rendered, "Deployment", name)["spec"]["template"]["spec"]
        keys = set()
        for constraint in spec["topologySpreadConstraints"]:
            assert selected(rendered, constraint["labelSelector"]) == {name}
            keys.add(constraint["topologyKey"])
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


# --- network policies ----------------------------------------------------------------------


def policies_for(objs: list[Obj], pod: str, kind: str) -> list[Obj]:
    labels = pod_labels(objs)[pod]
    return [
        p
        for p in of_kind(objs, "NetworkPolicy")
        if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def ingress_sources(objs: list[Obj], pod: str, port: int | str) -> list[Obj]:
    """The `from` peers of every rule letting traffic reach ``pod`` on ``port``."""
    c = container(objs, pod)
    names = {p["name"]: p["containerPort"] for p in c["ports"]}
    number = names.get(str(port), port)
    peers: list[Obj] = []
    for policy in policies_for(objs, pod, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            ports = [names.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if not ports or number in ports:
                peers.extend(rule.get("from", [{}]))  # no `from`: everyone
    return peers


def test_ingress_is_denied_by_default(rendered: list[Obj]) -> None:
    assert any(
        p["spec"]["podSelector"] == {}
        and p["spec"]["policyTypes"] == ["Ingress"]
        and not p["spec"].get("ingress")
        for p in of_kind(rendered, "NetworkPolicy")
    )


def test_network_policies_select_existing_pods(rendered: list[Obj]) -> None:
    for policy in of_kind(rendered, "NetworkPolicy"):
        if policy["spec"]["podSelector"]:
            assert selected(rendered, policy["spec"]["podSelector"]), policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selected(rendered, peer["podSelector"]), policy["metadata"]["name"]


def test_only_the_api_reaches_the_processor_and_redis(rendered: list[Obj]) -> None:
    pods = pod_labels(rendered)
    targets = [("processor", "grpc"), ("redis", "redis")]
    for pod, port in targets:
        if pod not in pods:
            continue  # the GKE overlay uses Memorystore
        peers = ingress_sources(rendered, pod, port)
        assert peers, f"nothing may reach {pod}"
        for peer in peers:
            assert set(peer) == {"podSelector"}, peer
            assert selected(rendered, peer["podSelector"]) == {"api"}, peer


def test_processor_and_redis_have_no_egress(rendered: list[Obj]) -> None:
    for pod in {"processor", "redis"} & set(pod_labels(rendered)):
        policies = policies_for(rendered, pod, "Egress")
        assert policies and all(not p["spec"].get("egress") for p in policies), pod


def test_metrics_are_reachable_by_the_scraper(rendered: list[Obj]) -> None:
    for pod in ("api", "processor"):
        peers = ingress_sources(rendered, pod, "metrics")
        assert peers, pod
        prometheus = "prometheus" in pod_labels(rendered)
        for peer in peers:
            if prometheus:
                assert selected(rendered, peer["podSelector"]) == {"prometheus"}
            else:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "gmp-system"
                }


# --- Prometheus ------------------------------------------------------------------------------


def test_base_prometheus_scrapes_both_services(base: list[Obj]) -> None:
    (cm,) = [c for c in of_kind(base, "ConfigMap") if c["metadata"]["name"].startswith("prom")]
    config = yaml.safe_load(cm["data"]["prometheus.yml"])
    headless = {s["metadata"]["name"]: s for s in of_kind(base, "Service")}
    ports = {}
    for job in config["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        (name,) = sd["names"]
        assert headless[name]["spec"]["clusterIP"] == "None"
        (pod,) = selected(base, {"matchLabels": headless[name]["spec"]["selector"]})
        ports[pod] = sd["port"]
    assert ports == {
        "api": int(flags(container(base, "api"))["metrics-port"]),
        "processor": int(flags(container(base, "processor"))["metrics-port"]),
    }


# --- the GKE overlay -------------------------------------------------------------------------


def test_gke_uses_memorystore_instead_of_the_in_cluster_redis(gke: list[Obj]) -> None:
    assert "redis" not in pod_labels(gke)
    assert not [s for s in of_kind(gke, "Service") if s["metadata"]["name"] == "redis"]
    env = {e["name"]: e for e in container(gke, "api")["env"]}
    for name in ("IMAGESCALER_RATELIMIT_STORAGE", "IMAGESCALER_REVOCATIONS"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "imagescaler-redis"


def test_gke_gives_the_api_a_workload_identity(gke: list[Obj]) -> None:
    spec = named(gke, "Deployment", "api")["spec"]["template"]["spec"]
    account = named(gke, "ServiceAccount", spec["serviceAccountName"])
    annotation = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert annotation.endswith(".iam.gserviceaccount.com")
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["IMAGESCALER_RESULT_STORE"]["value"].startswith("gs://")


def test_gke_pulls_from_artifact_registry(gke: list[Obj]) -> None:
    for _, spec in pod_specs(gke):
        for c in filter(is_ours, containers(spec)):
            assert re.match(r"[A-Z0-9a-z-]+-docker\.pkg\.dev/", c["image"]), c["image"]


def test_gke_monitoring_selects_both_services_by_port_name(gke: list[Obj]) -> None:
    assert "prometheus" not in pod_labels(gke)
    (monitoring,) = of_kind(gke, "PodMonitoring")
    pods = selected(gke, monitoring["spec"]["selector"])
    assert pods == {"api", "processor"}
    for endpoint in monitoring["spec"]["endpoints"]:
        for pod in pods:
            assert endpoint["port"] in {p["name"] for p in container(gke, pod)["ports"]}
