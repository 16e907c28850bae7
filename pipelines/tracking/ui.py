"""Where to look: MLflow UI links that open the model-training view, and the command that serves
the UI for a local store.

MLflow 3.17's UI opens every experiment in its GenAI view (Traces, Judges, "Detect issues"), and
``#/experiments/<id>`` alone shows no runs. The runs table is ``#/experiments/<id>/runs``, a run's
page ``…/runs/<run id>``; ``?workflowType=machine_learning`` after the hash route selects the
model-training view (measured, ``shared/stack-notes.md``).
"""

from __future__ import annotations

import shlex
import urllib.parse

LOCAL_UI_PORT = 5000
WORKFLOW_QUERY = "workflowType=machine_learning"


def run_url(base_url: str, experiment_id: str, run_id: str | None = None, page: str = "") -> str:
    """The UI page of a run (``page`` e.g. ``"model-metrics"``, ``"artifacts"``), or the runs table."""
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + (f"/{page}" if page else "")
    return f"{base_url.rstrip('/')}/{path}?{WORKFLOW_QUERY}"


def serve_command(uri: str, port: int = LOCAL_UI_PORT) -> str:
    """The lean ``mlflow ui`` command line for a local store (1 worker, no job execution: ~8 s, 420 MB)."""
    return ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
            f"{shlex.quote(uri)} --host 127.0.0.1 --port {int(port)} --workers 1")


def ui_command(uri: str, experiment_id: str | None = None, run_id: str | None = None, port: int = LOCAL_UI_PORT) -> str:
    """What a user runs to see a run: for a server, the URL to open; for a local store, the
    ``mlflow ui`` command line followed by the URL."""
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        return f"open {run_url(uri, experiment_id, run_id)}" if experiment_id else f"open {uri}"
    cmd = serve_command(uri, port)
    if experiment_id:
        cmd += f"\nthen open {run_url(f'http://127.0.0.1:{int(port)}', experiment_id, run_id)}"
    return cmd


__all__ = ["run_url", "serve_command", "ui_command", "WORKFLOW_QUERY"]
