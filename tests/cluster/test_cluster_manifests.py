"""The files under cluster/ are valid for their tools and in sync with the project.

* KubeRay ``RayCluster`` / ``RayJob`` manifests against the CRD schemas of KubeRay v1.7.0 (vendored,
  pruned, strict about unknown keys: cluster/schemas/make_schemas.py); the pod templates of the
  MLflow workloads against the ``PodTemplateSpec`` from the same CRD.
* The ``ray up`` YAML through Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up``
  runs before any cloud call).
* Sync: every ``python pipelines/train.py ...`` named in the manifests and in cluster/README.md runs
  here with ``--print-config`` and the overrides take effect; Ray versions, images, working dirs,
  secrets and volumes referenced are the ones defined; MLflow's host allow-list admits the URI the
  job is given.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = PROJECT_ROOT / "cluster"
SCHEMAS = CLUSTER / "schemas" / "kuberay-v1.7.0"
sys.path.insert(0, str(CLUSTER / "schemas"))
from make_schemas import WORKLOAD_KINDS, manifest_docs  # noqa: E402

DOCS = manifest_docs(CLUSTER)


def _docs(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(instance)]


RAYCLUSTER = _docs("RayCluster")[0]
RAYJOB = _docs("RayJob")[0]


# ------------------------------------------------------------------------------------------------
# KubeRay CRDs


def test_every_manifest_is_a_known_kind() -> None:
    kinds = sorted({d["kind"] for _, d in DOCS})
    assert kinds == ["Deployment", "Job", "PersistentVolumeClaim", "RayCluster", "RayJob", "Secret",
                     "Service", "StatefulSet"]
    for path, d in DOCS:
        name = d["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, f"{path}: bad name {name}"
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1", path


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_match_crd_schema(kind: str) -> None:
    schema = _schema(kind.lower())
    assert schema["x-elf-provenance"]["kuberay_version"] == "v1.7.0"
    for doc in _docs(kind):
        assert _errors(schema, doc) == []


def test_workload_pod_templates_match_podtemplate_schema() -> None:
    schema = _schema("podtemplate")
    workloads = [(p, d) for p, d in DOCS if d["kind"] in WORKLOAD_KINDS]
    assert len(workloads) == 4
    for path, d in workloads:
        assert _errors(schema, d["spec"]["template"]) == [], f"{path.name}: {d['kind']} {d['metadata']['name']}"


def _unchecked_paths(schema: dict[str, Any], inst: Any, path: str = "") -> Iterator[str]:
    """Paths the manifests use whose vendored schema is the bare ``{}`` of an unused sibling."""
    if schema == {} and inst not in ({}, [], None):
        yield path
        return
    if isinstance(inst, dict):
        props = schema.get("properties", {})
        for k, v in inst.items():
            sub = props.get(k) if k in props else schema.get("additionalProperties")
            if isinstance(sub, dict):
                yield from _unchecked_paths(sub, v, f"{path}/{k}")
    elif isinstance(inst, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(inst):
            yield from _unchecked_paths(schema["items"], v, f"{path}/{i}")


def test_vendored_schemas_cover_every_field_the_manifests_use() -> None:
    """A field added to a manifest after the schemas were pruned would only be checked by name:
    regenerate with `python cluster/schemas/make_schemas.py <kuberay checkout>`."""
    pairs = [("raycluster", RAYCLUSTER), ("rayjob", RAYJOB)]
    pairs += [("podtemplate", d["spec"]["template"]) for d in (d for _, d in DOCS if d["kind"] in WORKLOAD_KINDS)]
    for name, doc in pairs:
        assert list(_unchecked_paths(_schema(name), doc)) == [], name


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replica=2), "'replica' was unexpected"),
    (lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")), "'workerGroupSpec' was unexpected"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"), "'2' is not of type 'integer'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update({"nvidia.com/gpu": "eight"}), "does not match"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="6379"),
     "'6379' is not of type 'integer'"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(env={"A": "1"}),
     "{'A': '1'} is not of type 'array'"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
])  # fmt: skip
def test_schema_rejects_broken_raycluster(mutate, expected: str) -> None:
    bad = copy.deepcopy(RAYCLUSTER)
    mutate(bad)
    errors = _errors(_schema("raycluster"), bad)
    assert any(expected in e for e in errors), errors


def test_rayjob_creates_the_raycluster_spec() -> None:
    """One cluster definition: the RayJob's embedded cluster is the standalone RayCluster's spec."""
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"]


def test_gpu_worker_group_and_entrypoint_agree() -> None:
    import ray

    spec = RAYCLUSTER["spec"]
    assert spec["rayVersion"] == ray.__version__, "rayVersion must be the Ray the project installs"
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    gpus_per_pod = int(res["limits"]["nvidia.com/gpu"])
    overrides = dict(a.split("=", 1) for a in shlex.split(RAYJOB["spec"]["entrypoint"]) if "=" in a)
    assert int(overrides["ray.num_workers"]) == group["replicas"] * gpus_per_pod
    assert int(overrides["ray.cpus_per_worker"]) * gpus_per_pod <= int(res["limits"]["cpu"])
    assert overrides["ray.storage_path"].startswith("s3://")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    images = {c["image"] for g in [spec["headGroupSpec"], group] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith(f"-ray{ray.__version__}")


def test_dockerfile_builds_the_image_the_manifests_use() -> None:
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in src.split():
            assert (PROJECT_ROOT / item).exists(), f"Dockerfile copies {item}, which is not in the repository"
    assert re.search(r"pip install .*-e \.", text)
    runtime_env = yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == workdir


def _secret_keys(*files: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in files:
        for d in yaml.safe_load_all((CLUSTER / f).read_text()):
            if d and d["kind"] == "Secret":
                out[d["metadata"]["name"]] = set(d["stringData"])
    return out


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


@pytest.mark.parametrize("manifests, secrets", [
    (["kuberay/raycluster-elf-b.yaml", "kuberay/rayjob-elf-b.yaml"], ["kuberay/secrets.example.yaml"]),
    (["mlflow/mlflow-k8s.yaml"], ["mlflow/secrets.example.yaml"]),
])  # fmt: skip
def test_referenced_secrets_and_volumes_are_defined(manifests: list[str], secrets: list[str]) -> None:
    defined = _secret_keys(*secrets)
    claims = {d["metadata"]["name"] for f in secrets for d in yaml.safe_load_all((CLUSTER / f).read_text())
              if d and d["kind"] == "PersistentVolumeClaim"}
    for f in manifests:
        for doc in yaml.safe_load_all((CLUSTER / f).read_text()):
            for node in _walk(doc):
                ref = node.get("secretKeyRef")
                if ref:
                    assert ref["key"] in defined.get(ref["name"], set()), f"{f}: secret {ref['name']}/{ref['key']}"
                if "persistentVolumeClaim" in node:
                    assert node["persistentVolumeClaim"]["claimName"] in claims, f
                if "authOptions" in node:
                    assert "auth_token" in defined[node["authOptions"]["secretName"]]  # KubeRay's key


# ------------------------------------------------------------------------------------------------
# MLflow server


def _mlflow_server_flags(command: str) -> list[str]:
    line = command[command.index("mlflow server"):].replace("\\\n", " ")
    return sorted(tok for tok in shlex.split(line) if tok.startswith("--"))


def test_mlflow_server_deployments_agree_and_admit_the_job_uri() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    (deploy,) = [d for _, d in DOCS if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    compose = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())
    k8s_flags = _mlflow_server_flags(container["args"][0])
    assert k8s_flags == _mlflow_server_flags(compose["services"]["mlflow"]["command"][0])
    assert {"--backend-store-uri", "--serve-artifacts", "--artifacts-destination", "--allowed-hosts",
            "--app-name"} <= set(k8s_flags)
    # The Service exposes the container's port; the job's URI names that Service.
    (svc,) = [d for _, d in DOCS if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"]
    assert svc["spec"]["ports"][0]["targetPort"] == container["ports"][0]["containerPort"] == 5000
    uri = _secret_values("kuberay/secrets.example.yaml", "elf-mlflow")["tracking-uri"]
    host = re.match(r"https?://([^/]+)", uri).group(1)
    assert host.split(".")[0] == svc["metadata"]["name"]
    allowed = env["MLFLOW_ALLOWED_HOSTS"].split(",")
    for h in (host, "mlflow:5000", "localhost:5000"):  # in-cluster URI, short name, port-forward
        assert is_allowed_host_header(allowed, h), h
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    # docker-compose: every ${VAR} it needs is in env.example.
    needed = set(re.findall(r"\$\{(\w+)", (CLUSTER / "mlflow" / "docker-compose.yaml").read_text()))
    example = dict(line.split("=", 1) for line in (CLUSTER / "mlflow" / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert needed <= set(example)


def _secret_values(file: str, name: str) -> dict[str, str]:
    for d in yaml.safe_load_all((CLUSTER / file).read_text()):
        if d and d["kind"] == "Secret" and d["metadata"]["name"] == name:
            return d["stringData"]
    raise AssertionError(f"{file}: no Secret {name}")


# ------------------------------------------------------------------------------------------------
# ray up


def _ray_up_config() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "aws" / "elf-gpu.yaml").read_text())


def test_ray_up_yaml_passes_rays_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _ray_up_config()
    prepared = prepare_config(copy.deepcopy(cfg))  # defaults merged, as `ray up` does
    validate_config(prepared)  # Ray's ray-schema.json + its cross-field checks; no cloud call
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types and types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]
    # The project is synced and installed editable on every node, with Ray started from that venv.
    (remote, local), = cfg["file_mounts"].items()
    assert (PROJECT_ROOT / local / "pyproject.toml").is_file()
    assert any(f"-e {remote}" in c and "pip install" in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("~/elf-venv/bin/ray" in c for c in starts)


def test_ray_up_validation_rejects_typos() -> None:
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _ray_up_config()
    bad["available_node_types"]["gpu-8x-h100"]["min_worker"] = 1
    with pytest.raises(ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(bad))
    bad = _ray_up_config()
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


# ------------------------------------------------------------------------------------------------
# Entry points named in the manifests and the README


def _train_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `python pipelines/train.py`) of every training command in cluster/."""
    found = [("rayjob-elf-b.yaml entrypoint", RAYJOB["spec"]["entrypoint"])]
    sources = {"cluster/README.md": (CLUSTER / "README.md").read_text(),
               "aws/elf-gpu.yaml": "\n".join(re.sub(r"^#\s?", "", line) for line in
                                             (CLUSTER / "aws" / "elf-gpu.yaml").read_text().splitlines()
                                             if line.startswith("#"))}
    for where, text in sources.items():
        text = text.replace("\\\n", " ")
        for m in re.finditer(r"python pipelines/train\.py[^\n`]*", text):
            found.append((where, m.group(0)))
    out = []
    for where, cmd in found:
        argv = shlex.split(cmd)
        i = argv.index("pipelines/train.py")
        assert argv[i - 1] == "python", f"{where}: {cmd}"
        out.append((where, argv[i + 1:]))
    return out


TRAIN_COMMANDS = _train_commands()


def test_manifests_and_readme_name_training_commands() -> None:
    wheres = {w for w, _ in TRAIN_COMMANDS}
    assert {"rayjob-elf-b.yaml entrypoint", "cluster/README.md", "aws/elf-gpu.yaml"} <= wheres
    assert (PROJECT_ROOT / "pipelines" / "train.py").is_file()


@pytest.mark.parametrize("where, args", TRAIN_COMMANDS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(TRAIN_COMMANDS)])
def test_training_command_runs_here(where: str, args: list[str]) -> None:
    """The command's config exists and every override is a real key with a valid value."""
    args = [a for a in args if a != "--fresh"]
    proc = subprocess.run([sys.executable, "pipelines/train.py", *args, "--print-config"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{where}: {' '.join(args)}\n{proc.stderr[-2000:]}"
    resolved = yaml.safe_load(proc.stdout)
    for arg in args:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            section, field = key.split(".", 1) if "." in key else (None, key)
            got = resolved[section][field] if section else resolved[field]
            assert _same(got, value), f"{where}: {key}={value} resolved to {got!r}"


def _same(resolved: Any, given: str) -> bool:
    """A resolved config value equals the override's text (numbers by value, null as None, else as text)."""
    if given.lower() in ("null", "none", "~"):
        return resolved is None
    try:
        return float(resolved) == float(given)
    except (TypeError, ValueError):
        return str(resolved).lower() == given.lower()


# ------------------------------------------------------------------------------------------------
# README


def test_readme_scaling_table_is_the_scripts_output() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_calculator", PROJECT_ROOT / "benchmarks" / "scaling_calculator.py")
    calc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = calc  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(calc)
    table = calc.table

    text = (CLUSTER / "README.md").read_text()
    begin, end = "<!-- scaling-table:begin -->\n", "\n<!-- scaling-table:end -->"
    embedded = text[text.index(begin) + len(begin):text.index(end)]
    assert embedded == table(), "regenerate: python benchmarks/scaling_calculator.py, paste between the scaling-table markers"


def test_readme_shows_the_rayjob_entrypoint() -> None:
    readme = " ".join((CLUSTER / "README.md").read_text().split())
    assert " ".join(RAYJOB["spec"]["entrypoint"].split()) in readme
