"""deploy/k8s/ validated with kubeconform against the Kubernetes JSON schemas, and kept in
step with the command line and the health endpoints.

kubeconform is built from the Go module proxy. Its usual schema source is a download
from GitHub; here the schemas come from PyPI instead: the ``kubernetes-validate``
package (a dev dependency) ships the JSON schemas of each Kubernetes release, generated
from its OpenAPI document. They point at one another through ``$id`` URLs under
kubernetes.io, which kubeconform would try to fetch; ``schema_dir`` rewrites those
references into file-relative ones, leaving every schema's content as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBECONFORM = "github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0"
VERSIONS = ("1.30.0", "1.37.0")
"""The oldest and the newest Kubernetes release the manifests are checked against."""

pytestmark = pytest.mark.timeout(600)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


DOCS = _documents()
CONFIG = next(doc["data"] for _, doc in DOCS if doc["kind"] == "ConfigMap")
WORKLOADS = {
    doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] in ("Deployment", "StatefulSet")
}


def _go() -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        pytest.fail(
            "kubeconform is built with Go: install Go (https://go.dev/doc/install) "
            "and put `go` on PATH",
            pytrace=False,
        )
    return go


@pytest.fixture(scope="module")
def kubeconform(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bin_dir = tmp_path_factory.mktemp("gobin")
    built = subprocess.run(
        [_go(), "install", KUBECONFORM],
        env={**os.environ, "GOBIN": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert built.returncode == 0, built.stderr
    return bin_dir / "kubeconform"


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """kubernetes-validate's schemas of ``VERSIONS``, references made file-relative."""
    shipped = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    out = tmp_path_factory.mktemp("k8s-schemas")
    for version in VERSIONS:
        source = shipped / f"v{version}-local-strict"
        assert source.is_dir(), f"kubernetes-validate has no schemas for {version}"
        target = out / source.name
        target.mkdir()
        for schema in source.glob("*.json"):
            text = schema.read_text().replace('"/api/_definitions.json#', '"_definitions.json#')
            doc = json.loads(text)
            doc.pop("$id", None)
            (target / schema.name).write_text(json.dumps(doc))
    yield out


def _kubeconform(
    binary: Path, schemas: Path, version: str, *files: Path
) -> subprocess.CompletedProcess[str]:
    location = (
        f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}"
        "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    )
    return subprocess.run(
        [
            str(binary),
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            version,
            "-schema-location",
            location,
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_manifests_are_valid_kubernetes(
    kubeconform: Path, schema_dir: Path, version: str
) -> None:
    result = _kubeconform(kubeconform, schema_dir, version, *sorted(K8S.glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["valid"] == len(DOCS) and summary["skipped"] == 0, summary


def test_a_broken_manifest_is_refused(kubeconform: Path, schema_dir: Path, tmp_path: Path) -> None:
    engine = yaml.safe_load_all((K8S / "engine.yaml").read_text())
    docs = [doc for doc in engine if doc]
    statefulset = next(doc for doc in docs if doc["kind"] == "StatefulSet")
    statefulset["spec"]["replicas"] = "three"
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    result = _kubeconform(kubeconform, schema_dir, VERSIONS[-1], broken)
    assert result.returncode == 1, result.stdout
    assert "replicas" in result.stdout and "livenessprobe" in result.stdout, result.stdout


def _container(name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = WORKLOADS[name]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _expand(args: list[str]) -> list[str]:
    """Kubernetes' $(VAR) expansion, with the ConfigMap's values."""
    out = []
    for arg in args:
        for key, value in CONFIG.items():
            arg = arg.replace(f"$({key})", str(value))
        out.append(arg)
    return out


def test_every_part_is_deployed() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS}
    assert {
        ("StatefulSet", "terranoha-engine"),
        ("Deployment", "terranoha-worker"),
        ("Deployment", "terranoha-projector"),
        ("Deployment", "terranoha-api"),
        ("Service", "terranoha-engine"),
        ("Service", "terranoha-api"),
        ("ConfigMap", "terranoha-config"),
        ("Secret", "terranoha-postgres"),
        ("PodDisruptionBudget", "terranoha-engine"),
    } <= kinds


def test_every_command_line_parses() -> None:
    parser = build_parser()
    for name in WORKLOADS:
        args = _expand(_container(name)["args"])
        assert args[0] == "terranoha", name
        try:
            parsed = parser.parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(args)}` does not parse")
        assert parsed.kafka == CONFIG["TERRANOHA_KAFKA"], name


def test_the_engine_keeps_its_name_and_its_volume() -> None:
    engine = WORKLOADS["terranoha-engine"]
    assert engine["kind"] == "StatefulSet"
    assert engine["spec"]["podManagementPolicy"] == "Parallel"
    env = {e["name"]: e for e in _container("terranoha-engine")["env"]}
    # serve reads --instance-id from $TERRANOHA_INSTANCE_ID: the pod's stable name.
    assert env["TERRANOHA_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    parsed = build_parser().parse_args(["serve", "--kafka", "k:9092"])
    assert parsed.instance_id is None  # from the environment, not the manifest's args
    claims = [t["metadata"]["name"] for t in engine["spec"]["volumeClaimTemplates"]]
    mounts = [m["name"] for m in _container("terranoha-engine")["volumeMounts"]]
    assert claims == mounts == ["state"]


def test_probes_hit_the_health_endpoints_on_the_configured_port() -> None:
    port = int(CONFIG["TERRANOHA_HEALTH_PORT"])
    assert CONFIG["TERRANOHA_HEALTH_HOST"] == "0.0.0.0"  # reachable by the kubelet
    for name in WORKLOADS:
        container = _container(name)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if name == "terranoha-api":
            # The API answers /healthz itself, on its own port: 503 while its backend is
            # down, which is what readiness needs.
            probe = {"path": "/healthz", "port": "http"}
            assert container["livenessProbe"]["httpGet"] == probe, name
            assert container["readinessProbe"]["httpGet"] == probe, name
        else:
            assert ports["health"] == port, name
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        # The liveness answer waits up to 5 s for the event loop: the probe waits longer.
        assert container["livenessProbe"]["timeoutSeconds"] > 5, name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        refs = {ref.get("configMapRef", {}).get("name") for ref in container["envFrom"]}
        assert "terranoha-config" in refs, name


def test_selectors_match_their_workloads() -> None:
    labels = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in WORKLOADS.items()}
    for file, doc in DOCS:
        selector = None
        if doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        if selector is not None:
            matched = [n for n, have in labels.items() if selector.items() <= have.items()]
            assert len(matched) == 1, (file, doc["metadata"]["name"], matched)
    for name, workload in WORKLOADS.items():
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels[name].items()
