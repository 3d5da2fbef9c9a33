"""The Kubernetes manifests: valid against the Kubernetes API schema (offline), and consistent with
what service.py serves (port, probe paths) and with each other."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

MANIFESTS = REPO / "deploy" / "kubernetes"


def resources() -> dict[str, dict]:
    docs = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("kind", ["Namespace", "Deployment", "Service", "HorizontalPodAutoscaler"])
def test_manifest_is_valid_against_the_api_schema(kind):
    kubernetes_validate.validate(resources()[kind], "1.33", strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert all((MANIFESTS / Path(name)).is_file() for name in listed)


def test_ports_probes_and_threads_match_the_service():
    from bentoml._internal.service.openapi import make_infra_endpoints

    docs = resources()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = container["ports"][0]
    assert port["containerPort"] == 3000  # `bentoml serve` and the containerized bento listen on 3000
    served = set(make_infra_endpoints())  # BentoML's own health endpoints, served by every service
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in served
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez" in served
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CELLSEG_ORT_THREADS"] == str(container["resources"]["limits"]["cpu"])
    # the Service reaches the container's port, the selector matches the pods, the HPA scales this Deployment
    service = docs["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == port["name"]
    assert service["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])


def test_scale_down_drains_requests_and_the_autoscaler_owns_the_count():
    """A user's trial: a 60 s grace period killed requests that may wait 180 s for their turn and run
    to the 300 s traffic timeout, and `replicas: 2` beside the HPA reset a scaled-out Deployment on
    every apply."""
    import re

    docs = resources()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    service_py = (REPO / "service.py").read_text()
    traffic_timeout = max(int(t) for t in re.findall(r'traffic=\{"timeout": (\d+)', service_py))
    pause = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= traffic_timeout + pause
    assert "replicas" not in docs["Deployment"]["spec"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


def test_the_readme_overlay_names_the_image_the_deployment_uses():
    """README's overlay (deploy/site/, git-ignored) replaces `kustomize edit set image`, which needed the
    standalone kustomize CLI and edited the tracked kustomization.yaml."""
    import re

    readme = (REPO / "README.md").read_text()
    text = re.search(r"printf '([^']+)' > deploy/site/kustomization\.yaml", readme).group(1)
    overlay = yaml.safe_load(text.replace("\\n", "\n"))
    assert overlay["resources"] == ["../kubernetes"]
    container = resources()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert overlay["images"][0]["name"] == container["image"]
    assert "deploy/site" in (REPO / ".gitignore").read_text()
