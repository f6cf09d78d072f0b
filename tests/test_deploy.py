"""The Kubernetes manifests under deploy/ (offline): each one valid against the
bundled Kubernetes schemas, and wired to the image: its ports, BentoML's health
endpoints, its user, resources, and autoscalers that target the Deployments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

KUBERNETES_VERSION = "1.33"
DEPLOY = ROOT / "deploy"
MANIFEST_FILES = sorted(DEPLOY.rglob("*.yaml"))
HTTP_PORT, GRPC_PORT, RUNNER_PORT = 8501, 8500, 9001

Resource = dict[str, Any]


def resources(directory: Path) -> list[Resource]:
    return [doc for path in sorted(directory.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs: list[Resource], kind: str, name: str) -> Resource:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(deployment: Resource) -> dict[str, Resource]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def ports(container: Resource) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def http_probe(container: Resource, probe: str) -> tuple[str, int]:
    handler = container[probe]["httpGet"]
    return handler["path"], ports(container)[handler["port"]]


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        # strict: unknown fields (a misspelt probe, say) are errors too
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", [DEPLOY, DEPLOY / "distributed"], ids=["single", "distributed"])
def test_pods_run_the_image_as_bentomls_user_with_resources(directory: Path) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    for deployment in (d for d in resources(directory) if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == BENTO_UID_GID
        for container in pod["containers"]:
            assert container["image"] == "inception_v3:latest"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
            assert "memory" in container["resources"]["limits"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_single_pod_serves_both_protocols_with_bentoml_probes() -> None:
    docs = resources(DEPLOY)
    deployment = one(docs, "Deployment", "inception-v3")
    (container,) = containers(deployment).values()
    assert "args" not in container and "command" not in container  # the image's launcher: one runner, both servers
    assert ports(container)["http"] == HTTP_PORT and ports(container)["grpc"] == GRPC_PORT
    assert http_probe(container, "livenessProbe") == ("/livez", HTTP_PORT)
    assert http_probe(container, "readinessProbe") == ("/readyz", HTTP_PORT)
    assert http_probe(container, "startupProbe") == ("/readyz", HTTP_PORT)

    service = one(docs, "Service", "inception-v3")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"]: ports(container)[p["targetPort"]] for p in service["spec"]["ports"]} == {
        HTTP_PORT: HTTP_PORT,
        GRPC_PORT: GRPC_PORT,
    }


@pytest.mark.parametrize("directory", [DEPLOY, DEPLOY / "distributed"], ids=["single", "distributed"])
def test_every_deployment_has_an_autoscaler_on_cpu(directory: Path) -> None:
    docs = resources(directory)
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    autoscalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    targets = {a["spec"]["scaleTargetRef"]["name"] for a in autoscalers}
    assert targets == deployments
    for autoscaler in autoscalers:
        spec = autoscaler["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment" and spec["scaleTargetRef"]["apiVersion"] == "apps/v1"
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]


def test_distributed_api_servers_share_the_runner_service() -> None:
    docs = resources(DEPLOY / "distributed")
    runner = one(docs, "Deployment", "inception-v3-runner")
    (runner_container,) = containers(runner).values()
    assert runner_container["args"][0] == "start-runner-server"
    assert http_probe(runner_container, "livenessProbe") == ("/livez", RUNNER_PORT)
    assert http_probe(runner_container, "readinessProbe") == ("/readyz", RUNNER_PORT)
    runner_service = one(docs, "Service", "inception-v3-runner")
    assert [p["port"] for p in runner_service["spec"]["ports"]] == [RUNNER_PORT]
    address = f"inception_v3=tcp://inception-v3-runner:{RUNNER_PORT}"

    api = containers(one(docs, "Deployment", "inception-v3-api"))
    assert api["http"]["args"][:3] == ["start-http-server", "--depends", address]
    assert api["grpc"]["args"][:3] == ["start-grpc-server", "--remote-runner", address]
    assert http_probe(api["http"], "livenessProbe") == ("/livez", HTTP_PORT)
    assert http_probe(api["http"], "readinessProbe") == ("/readyz", HTTP_PORT)
    for probe in ("livenessProbe", "readinessProbe"):
        assert api["grpc"][probe]["grpc"]["port"] == GRPC_PORT
    for container in (runner_container, api["http"], api["grpc"]):  # not a model in each API server
        assert {"name": "INCEPTION_V3_RUNNER", "value": "shared"} in container["env"]


def test_bentofile_pins_the_same_packages_as_requirements() -> None:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(bentofile["python"]["packages"]) == sorted(requirements)
