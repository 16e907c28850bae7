"""Check what a person sees in the MLflow UI, in a real headless Chromium, waiting in real time for
the charts to render (a virtual-time screenshot shows only spinners; ``shared/stack-notes.md``).

    python scripts/check_ui.py                       # the embedded default's newest run in ./mlruns
    python scripts/check_ui.py --tracking-uri sqlite:////abs/mlflow.db --run-id <training run> --out ui/

It serves the store with a lean ``mlflow ui`` (unless ``--url`` names a running server), opens

1. the training run's "Model metrics" tab (the link ELF Lab prints: model-training view) and checks
   that its first screen shows the loss curve — a chart titled ``loss`` with more than one point;
2. the frontier PNG of a sweep nested under the training run (``frontier/frontier.png``) on that
   sweep's artifact page, and checks the image loaded (its natural size);
3. the frontier-over-training plot of the evaluation beside training
   (``eval/frontier_over_training.png``) on the training run's own artifact page, the same way.

A check whose artifact the run does not have is reported as not applicable; at least one of 2 and 3
must apply.

writes a screenshot of each into ``--out`` and prints one JSON report; exit status 1 when a check
fails. Needs Playwright (the dev extra) and Debian's chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

CHROMIUM = "/usr/bin/chromium"
OVER_TRAINING = "eval/frontier_over_training.png"  # pipelines/training/eval_record.py, log_plot
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(uri: str) -> tuple[str, subprocess.Popen]:
    """A lean local ``mlflow ui`` on a free port, healthy; returns ``(base url, process)``."""
    from pipelines.tracking.ui import serve_command

    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = serve_command(uri, port).split(" ", 1)[1].split()  # drop the env assignment: it is in env
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", *cmd[1:]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return base, proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow ui on {uri} did not become healthy")


def newest_training_run(client: Any) -> Any:
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, "tags.`elf.kind` = 'training'", order_by=["attributes.start_time DESC"],
                               max_results=1) if exps else []
    if not found:
        raise SystemExit("no training run in the store: train first (python pipelines/train.py)")
    return found[0]


def check_metrics(page: Any, url: str, shot: Path, wait_s: float) -> dict[str, Any]:
    """The first screen of the Model metrics tab shows a multi-point ``loss`` chart."""
    page.goto(url)
    page.wait_for_selector(".js-plotly-plot", timeout=wait_s * 1000)
    time.sleep(3)  # charts are drawn lazily: let every visible one finish in real time
    page.screenshot(path=str(shot))
    # Each chart card's legend reads "<run name> (<metric key>)": the key names the chart.
    charts = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(el => {
        let n = el;
        for (let hops = 0; n && hops < 8; hops++) {
            n = n.parentElement;
            if (n && n.innerText && /\\(([^)]+)\\)/.test(n.innerText)) break;
        }
        const m = n && n.innerText ? n.innerText.match(/\\(([^)]+)\\)/) : null;
        const r = el.getBoundingClientRect();
        const points = Math.max(0, ...(el.data || []).map(tr => (tr.x || []).length));
        return {title: m ? m[1] : '', points, visible: r.top < window.innerHeight && r.bottom > 0};
    })""")
    first = [c for c in charts if c["visible"]]
    loss = [c for c in first if c["title"].split("/")[-1] == "loss"]  # curves/loss (pipelines/tracking/names.py)
    return {"url": url, "screenshot": str(shot), "charts_on_first_screen": [c["title"] for c in first],
            "loss_chart_points": max((c["points"] for c in loss), default=0),
            "ok": bool(loss) and max(c["points"] for c in loss) > 1}


def check_frontier(page: Any, url: str, shot: Path, wait_s: float) -> dict[str, Any]:
    page.goto(url)
    # The artifact viewer fetches the file and shows it from a blob: URL once it has loaded.
    found = "() => [...document.querySelectorAll('img')].find(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
    try:
        page.wait_for_function(found, timeout=wait_s * 1000)
    except Exception as e:  # noqa: BLE001 - playwright's TimeoutError: report it with what the page showed
        page.screenshot(path=str(shot))
        return {"url": url, "screenshot": str(shot), "ok": False, "why": f"no image after {wait_s:g} s: {e}"[:300]}
    size = page.evaluate(f"() => {{ const i = ({found})(); return [i.naturalWidth, i.naturalHeight]; }}")
    page.screenshot(path=str(shot))
    return {"url": url, "screenshot": str(shot), "image_size": size, "ok": size[0] > 0}


def run_checks(uri: str, run_id: Optional[str], out: Path, url: Optional[str] = None,
               wait_s: float = 60.0) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from pipelines.tracking.runs import child_runs
    from pipelines.tracking.store import make_client
    from pipelines.tracking.ui import run_url

    client = make_client(uri)
    run = client.get_run(run_id) if run_id else newest_training_run(client)
    exp = run.info.experiment_id
    sweeps = [r for r in child_runs(client, exp, run.info.run_id) if r.data.tags.get("elf.kind") == "frontier-sweep"]
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if url is None:
        url, server = serve(uri)
    report: dict[str, Any] = {"training_run": run.info.run_id}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            # A fresh page per check: within one page the UI is a single-page app whose cached run state
            # (measured: an artifact list read on the metrics tab) would hide what a new visitor sees.
            def page() -> Any:
                return browser.new_page(viewport={"width": 1400, "height": 900})

            report["metrics"] = check_metrics(page(), run_url(url, exp, run.info.run_id, "model-metrics"),
                                              out / "model-metrics.png", wait_s)
            if sweeps:
                art = run_url(url, exp, sweeps[0].info.run_id, "artifacts/frontier/frontier.png")
                report["frontier"] = check_frontier(page(), art, out / "frontier.png", wait_s)
            if any(f.path == OVER_TRAINING for f in client.list_artifacts(run.info.run_id, "eval")):
                art = run_url(url, exp, run.info.run_id, f"artifacts/{OVER_TRAINING}")
                report["over_training"] = check_frontier(page(), art, out / "frontier_over_training.png", wait_s)
            browser.close()
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
    plots = [report[k]["ok"] for k in ("frontier", "over_training") if k in report]
    if not plots:
        report["plots"] = "neither a sweep nested under the run nor an evaluation beside training to look at"
    report["ok"] = report["metrics"]["ok"] and bool(plots) and all(plots)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else <root>/mlruns/mlflow.db")
    p.add_argument("--run-id", default=None, help="the training run (default: the newest one)")
    p.add_argument("--url", default=None, help="a running MLflow server's base URL (default: serve the store)")
    p.add_argument("--out", type=Path, default=Path("outputs/ui-check"), help="screenshots (default outputs/ui-check)")
    args = p.parse_args(argv)
    from pipelines.tracking.store import resolve_tracking_uri

    report = run_checks(resolve_tracking_uri(args.tracking_uri), args.run_id, args.out, args.url)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
