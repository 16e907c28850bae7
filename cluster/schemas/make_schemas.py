"""Regenerate the vendored KubeRay schemas in this folder from KubeRay's CRD files.

    python cluster/schemas/make_schemas.py KUBERAY_CHECKOUT [--version v1.7.0]

KUBERAY_CHECKOUT is a clone of github.com/ray-project/kuberay at the tag named by ``--version``; the
CRDs are read from ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml``. (No PyPI
package ships them and tests run offline, hence the vendored copies.)

The full CRD schemas are ~2.3 MB (every Kubernetes PodSpec field, twice). What is vendored is the
``v1`` ``openAPIV3Schema`` pruned to the fields ELF Lab's manifests use, walking the manifests:

* every object on a used path keeps *all* its property names — an unused one maps to ``{}`` (any
  value) — and gains ``additionalProperties: false``, so a misspelt or misplaced key is an error,
  as with ``kubectl apply --validate=strict``;
* used properties keep their full schema (types, enums, patterns, ``required``, int-or-string
  quantities), recursively pruned the same way; descriptions are dropped.

Three schemas come out: ``raycluster.json`` and ``rayjob.json`` (whole objects), and
``podtemplate.json`` (the ``PodTemplateSpec`` embedded in the RayCluster CRD) for the pod templates
of the plain Kubernetes workloads in cluster/mlflow/ (Deployment, StatefulSet, Job). Each carries
its provenance (KubeRay version, file, sha256) in ``$comment`` / ``x-elf-provenance``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

HERE = Path(__file__).resolve().parent
CLUSTER = HERE.parent
CRD_DIR = "ray-operator/config/crd/bases"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")
DROP_KEYS = {"description"}


def manifest_docs(root: Path = CLUSTER) -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object (a mapping with ``kind``) in the YAML files under ``root``."""
    docs = []
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                docs.append((path, doc))
    return docs


def pod_templates(docs: Iterable[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ``spec.template`` of every plain workload object."""
    return [d["spec"]["template"] for _, d in docs if d["kind"] in WORKLOAD_KINDS]


def prune(schema: dict[str, Any], instances: list[Any]) -> dict[str, Any]:
    """``schema`` restricted to the paths ``instances`` use (see the module docstring)."""
    out = {k: v for k, v in schema.items() if k not in DROP_KEYS | {"properties", "items", "additionalProperties"}}
    if "properties" in schema:
        props = {}
        for name, sub in schema["properties"].items():
            used = [inst[name] for inst in instances if isinstance(inst, dict) and name in inst]
            props[name] = prune(sub, used) if used else {}
        out["properties"] = props
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):  # a map: every value has this schema
        values = [v for inst in instances if isinstance(inst, dict) for v in inst.values()]
        out["additionalProperties"] = prune(schema["additionalProperties"], values)
    elif "additionalProperties" in schema:
        out["additionalProperties"] = schema["additionalProperties"]
    if "items" in schema:
        items = [v for inst in instances if isinstance(inst, list) for v in inst]
        out["items"] = prune(schema["items"], items)
    return out


def crd_schema(path: Path, version: str = "v1") -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise SystemExit(f"{path}: no version {version}")


def provenance(kuberay_version: str, path: Path) -> dict[str, str]:
    return {"kuberay_version": kuberay_version, "file": f"{CRD_DIR}/{path.name}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "crd_version": "v1"}


def build(checkout: Path, kuberay_version: str) -> dict[str, dict[str, Any]]:
    docs = manifest_docs()
    out = {}
    for kind, fname in CRDS.items():
        path = checkout / CRD_DIR / fname
        instances = [d for _, d in docs if d["kind"] == kind]
        if not instances:
            raise SystemExit(f"no {kind} manifest under {CLUSTER}")
        schema = prune(crd_schema(path), instances)
        prov = provenance(kuberay_version, path)
        schema = {"$comment": f"{kind} v1 from KubeRay {kuberay_version} {prov['file']}, pruned to the fields "
                              "ELF Lab's manifests use by cluster/schemas/make_schemas.py",
                  "x-elf-provenance": prov, **schema}
        out[kind.lower() + ".json"] = schema
    # PodTemplateSpec, as embedded in RayCluster.spec.headGroupSpec.template.
    path = checkout / CRD_DIR / CRDS["RayCluster"]
    template = crd_schema(path)["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    prov = provenance(kuberay_version, path)
    out["podtemplate.json"] = {
        "$comment": f"PodTemplateSpec from KubeRay {kuberay_version} {prov['file']} "
                    "(spec.headGroupSpec.template), pruned to the pod templates of cluster/ workloads",
        "x-elf-provenance": {**prov, "path": "spec.headGroupSpec.template"},
        **prune(template, pod_templates(docs)),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", type=Path, help="a kuberay clone checked out at --version")
    ap.add_argument("--version", default="v1.7.0")
    ap.add_argument("--out", type=Path, default=None, help="default: cluster/schemas/kuberay-<version>")
    args = ap.parse_args(argv)
    args.out = args.out or HERE / f"kuberay-{args.version}"
    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in build(args.checkout, args.version).items():
        (args.out / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out / name} ({len(json.dumps(schema)):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
