"""What a user sees: a search's experiment in MLflow's own UI, opened from the page dettune prints, rendered by
headless Chromium (Debian's `chromium`) against a real `mlflow server`."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

from services import mlflow_server

from search.tracking import Tracker
from tracking_names import experiment_page

TRIALS = 3


def _page_text(url: str, profile: Path) -> str:
    """The page's visible text once its scripts have run and their requests returned."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: apt-get install -y chromium"
    done = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1600,1200", "--dump-dom", url],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_the_printed_page_opens_a_search_in_the_model_training_view(tmp_path: Path) -> None:
    with mlflow_server(tmp_path) as url:
        tracker = Tracker(url, "ui-view")
        for n in range(TRIALS):
            tracker.start_trial(f"t{n}", {"lr": 0.01 * (n + 1)})
            tracker.log_epoch(f"t{n}", {"epoch": 1, "val/bbox_mAP": 0.1 * n, "train/loss": 1.0})
        printed = _page_text(experiment_page(url, tracker.experiment_id), tmp_path / "printed")
        bare = _page_text(f"{url}/#/experiments/{tracker.experiment_id}", tmp_path / "bare")

    # The runs table, the parent and its trials: the view with runs, metrics and charts.
    assert "Run Name" in printed and f"{TRIALS + 1} matching runs" in printed and "ui-view" in printed, printed
    # The control: a fresh browser opening the experiment's plain address lands in the GenAI view (token usage,
    # no runs table), whatever the experiment's kind tag says; if this fails, MLflow chooses differently now.
    assert "Token Usage" in bare and "Run Name" not in bare, bare
