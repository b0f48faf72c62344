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

MAPS = (0.25, 0.375, 0.125)
"""Each trial's val/bbox_mAP, out of the order the trials start in, so the page's ranking shows."""

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


def test_the_printed_page_opens_the_trials_ranked_with_the_log_columns_in_the_training_view(tmp_path: Path) -> None:
    with mlflow_server(tmp_path) as url:
        tracker = Tracker(url, "ui-view")
        tracker.save_runs_view("val/bbox_mAP", "max")
        for n, score in enumerate(MAPS):
            tracker.start_trial(f"t{n}", {"lr": 0.01 * (n + 1)})
            tracker.log_epoch(f"t{n}", {"epoch": 1, "val/bbox_mAP": score, "train/loss": 1.5 + n})
        printed = _page_text(experiment_page(url, tracker.experiment_id), tmp_path / "printed")
        bare = _page_text(f"{url}/#/experiments/{tracker.experiment_id}", tmp_path / "bare")
    # The runs table of the trials alone (the parent filtered out), ranked by the metric, with the log's columns
    # (those the runs hold) holding each trial's values: the cells come row by row, the metric's column first.
    assert "Run Name" in printed and f"{len(MAPS)} matching runs" in printed, printed
    assert "Sort: val/bbox_mAP" in printed, printed
    ranked = sorted(range(len(MAPS)), key=lambda n: MAPS[n], reverse=True)
    names = [f"ui-view-{n + 1}" for n in ranked]
    header = printed[printed.index("Run Name"):printed.index(names[0])]
    assert "val/bbox_mAP" in header and "train/loss" in header, printed
    places = [printed.find(name) for name in names]
    assert -1 not in places and places == sorted(places), printed
    cells = " ".join(f"{MAPS[n]:g} {1.5 + n:g}" for n in ranked)
    assert cells in printed[places[-1]:], printed
    # The control: a fresh browser opening the experiment's plain address lands in the GenAI view (token usage,
    # no runs table), whatever the experiment's kind tag says; if this fails, MLflow chooses differently now.
    assert "Token Usage" in bare and "Run Name" not in bare, bare
