"""Checkpoints as registered MLflow model versions: the one registry-name rule, registering a
checkpoint directory, and resolving ``models:/<name>/<version|latest>`` / ``models:/<name>@<alias>``.

MLflow 3.17 reserves the alias ``latest`` (``set_registered_model_alias`` raises), and
``models:/<name>/latest`` already resolves to the newest version, so ``latest`` is never set here.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.tracking.runs import slug, stringify
from pipelines.tracking.store import TrackingError

CHECKPOINT_ARTIFACTS = "checkpoint"  # artifact path of a training run's registered checkpoint
# What a registered version holds: the weights, EMA (optional) and what rebuilds the model — no optimizer state.
REGISTERED_FILES = ("model.safetensors", "ema.safetensors", "config.yaml", "meta.json")


def registered_model_name(name: str) -> str:
    """The registry name of a run's models: ``elf-<slug(name)>`` (MLflow forbids '/' and ':')."""
    return f"elf-{slug(name)}"


def model_name_for(cfg: Any) -> str:
    """``tracking.registered_model`` when the config sets it, else :func:`registered_model_name`."""
    return cfg.tracking.registered_model or registered_model_name(cfg.name)


def parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/name/3`` → (name, "3"); ``models:/name/latest`` → (name, "latest");
    ``models:/name@alias`` → (name, "@alias")."""
    rest = uri[len("models:/"):].strip("/") if uri.startswith("models:/") else ""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, "@" + alias
    elif "/" in rest:
        name, ref = rest.rsplit("/", 1)
        if name and (ref.isdigit() or ref == "latest"):
            return name, ref
    raise TrackingError(f"'{uri}': expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    """The model version a ``models:/`` URI names; a missing model, version or alias is one line."""
    name, ref = parse_models_uri(uri)
    try:
        if ref.startswith("@"):
            return client.get_model_version_by_alias(name, ref[1:])
        if ref.isdigit():
            return client.get_model_version(name, ref)
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        known = ""
        with contextlib.suppress(MlflowException):
            rm = client.get_registered_model(name)
            known = f" (it has aliases {sorted(rm.aliases) or 'none'})" if ref.startswith("@") else ""
        raise TrackingError(f"'{uri}': not in the model registry of {client.tracking_uri}{known}: "
                            f"{e.message.splitlines()[0][:300]}") from None
    if not versions:
        raise TrackingError(f"'{uri}': registered model '{name}' has no versions in {client.tracking_uri}")
    return max(versions, key=lambda v: int(v.version))


def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """Versions of model ``name`` registered from ``run_id``, newest first."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda v: -int(v.version))


def last_of_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    """``models:/<name>/<version>`` of the run's final model: the ``@last`` version when this run
    registered it, else the run's newest version (None when it registered none)."""
    with contextlib.suppress(MlflowException):
        mv = client.get_model_version_by_alias(name, "last")
        if mv.run_id == run_id:
            return f"models:/{name}/{mv.version}"
    versions = versions_of_run(client, name, run_id)
    return f"models:/{name}/{versions[0].version}" if versions else None


def register_checkpoint(client: MlflowClient, run_id: str, checkpoint_dir: Path, name: str, *,
                        alias: str | None = None, files: Sequence[str] | None = None,
                        artifact_path: str = CHECKPOINT_ARTIFACTS, tags: Mapping[str, Any] | None = None) -> str:
    """Log ``checkpoint_dir`` (or just ``files`` of it) as run artifacts under ``artifact_path`` and
    register them as a new version of ``name`` (created if missing), optionally aliased. Returns the
    version number. ``mlflow.artifacts.download_artifacts("models:/<name>/<version>")`` gives the files back."""
    ckpt = Path(checkpoint_dir)
    if "/" in name or ":" in name or not name.strip():
        raise TrackingError(f"registered model name {name!r}: MLflow forbids '/' and ':' (e.g. 'elf-local')")
    if alias is not None and alias.strip().lower() == "latest":
        raise TrackingError("MLflow reserves the model alias 'latest'; models:/<name>/latest already resolves to "
                            "the newest version. Use another alias (e.g. 'last' or 'best').")
    missing = [f for f in files or () if not (ckpt / f).is_file()]
    if not ckpt.is_dir() or missing:
        raise TrackingError(f"checkpoint {ckpt} is missing or lacks {missing}")
    if files is None:
        client.log_artifacts(run_id, str(ckpt), artifact_path)
    for f in files or ():
        sub = posixpath.dirname(f)
        client.log_artifact(run_id, str(ckpt / f), posixpath.join(artifact_path, sub) if sub else artifact_path)
    with contextlib.suppress(MlflowException):  # exists already, or a concurrent creator won
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=run_id,
                                     tags={str(k): stringify(v) for k, v in (tags or {}).items()} or None)
    deadline = time.monotonic() + 60
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(0.2)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise TrackingError(f"model version {name}/{mv.version} is {mv.status}: {mv.status_message}")
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def tag_version(client: MlflowClient, mv: ModelVersion, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(mv.name, mv.version, k, stringify(v, 5000))


__all__ = ["REGISTERED_FILES", "registered_model_name", "model_name_for", "parse_models_uri", "resolve_version", "versions_of_run", "last_of_run",
           "register_checkpoint", "tag_version", "CHECKPOINT_ARTIFACTS"]
