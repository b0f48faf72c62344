"""``dettune report``: one search's results, read back from MLflow, in the team's experiment-log format.

``report.md`` follows the log (``experiment-log.md``): a write-up skeleton (hypothesis and method from the
space file, the result filled with the measured effect of each searched knob), one row per trial with exactly
the log's columns, the failed trials with their reason, the plots, and the leaderboard table. A trial's scores
come from its best epoch by the search's metric, the checkpoint ``dettune export`` would hand over (the log
asks for "the best checkpoint used for inference"); mAPs print in percent with one decimal, as the log does.
The search comes from :mod:`results.store`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mlflow.entities import Metric, Run

from cocodata.datacheck import DatasetCard
from cocodata.datacleaning import LEFT_OUT_FILE, TAG_LEFT_OUT
from mmconfigs.backbones import catalog_name
from mmconfigs.build import BuildError, current_head, load_base
from results.importance import MIN_TRIALS, Importances, knob_importances
from results.plots import (
    Axis,
    Curve,
    Group,
    PlotFile,
    plot_best_so_far,
    plot_class_counts,
    plot_curves,
    plot_importances,
    plot_knob,
    plot_pareto,
)
from results.store import LB_METRIC, SearchHandle, TrialRecord, add_tracking_flag, open_search, open_tracking
from spaces.distributions import Choice, Grid
from spaces.knobs import param_text, show_value
from spaces.objectives import (
    COST_METRICS,
    FPS_METRIC,
    GFLOPS_METRIC,
    PARAMS_METRIC,
    feasible_front,
    is_feasible,
    trial_values,
)
from spaces.schema import Space
from tracking_names import LOG_METRICS as METRIC_COLUMNS
from tracking_names import STOPPED_BY_BUDGET, TAG_INHERITED, TAG_PARETO

KNOB_COLUMNS = {"Backbone": "backbone", "RoI Head": "roi_head", "initial lr": "lr", "Lr schd": "schedule",
                "Optimizer": "optimizer"}
FPS_COLUMN = "Inf time (fps)"
COST_COLUMNS = {FPS_COLUMN: FPS_METRIC, "GFLOPs": GFLOPS_METRIC, "Params (M)": PARAMS_METRIC}
COLUMNS = ("Exp num", "Backbone", "RoI Head", "Epoch", "initial lr", "Lr schd", "Optimizer", *COST_COLUMNS,
           *METRIC_COLUMNS)
"""The experiment log's columns, in its order."""

MISSING = "-"
SORT_METRIC = "val/bbox_mAP"
REPORT_ARTIFACTS = "report"
_BINS = 3


# --- formatting -----------------------------------------------------------------------------------------

def is_map(key: str) -> bool:
    """Whether ``key`` is one of the val mAPs (0..1 in MLflow, percent in the log)."""
    return key.startswith("val/bbox_mAP")


def shown(key: str, value: float) -> float:
    """The value as the log writes it: mAPs (0..1 in MLflow) in percent, anything else unchanged."""
    return 100.0 * value if is_map(key) else value


def format_value(key: str, value: float | None) -> str:
    """A metric cell: mAP in percent and accuracies/fps with one decimal, losses with three."""
    if value is None or not math.isfinite(value):
        return MISSING
    if is_map(key) or key.endswith("acc") or key == FPS_METRIC:
        return f"{shown(key, value):.1f}"
    if key in COST_METRICS:
        return f"{value:.2f}"
    return f"{value:.3f}"


def epoch_cell(trial: TrialRecord, max_epochs: int) -> str:
    """Epochs trained; an early end says why (``1/4 (stopped by ASHA)``)."""
    if trial.status == "completed":
        return str(trial.epochs)
    reason = {"stopped": "stopped by ASHA", "failed": "failed"}.get(trial.status, trial.status)
    if trial.stopped_by == STOPPED_BY_BUDGET:
        reason = "stopped at the time budget"
    return f"{trial.stopped_at or trial.epochs}/{max_epochs} ({reason})"


def base_knobs(base: str) -> dict[str, str]:
    """The base config's backbone, head, lr, schedule and optimizer: what a trial has where the space sets none."""
    try:
        cfg = load_base(base)
    except BuildError:  # the base file lives on another machine
        return {}
    optimizer = cfg.optim_wrapper.optimizer
    return {"backbone": catalog_name(cfg.model.backbone) or str(cfg.model.backbone.type),
            "roi_head": current_head(cfg) or str(cfg.model.type), "lr": str(optimizer.lr),
            "optimizer": str(optimizer.type).lower(),
            "schedule": "cosine" if "Cosine" in str(cfg.get("param_scheduler")) else "step"}


def table_row(trial: TrialRecord, space: Space, defaults: Mapping[str, str]) -> list[str]:
    """The trial's cells in :data:`COLUMNS` order."""
    knobs = {**defaults, **trial.params}
    lr = knobs.get("lr")
    cells = {column: knobs.get(knob, MISSING) for column, knob in KNOB_COLUMNS.items()}
    cells.update({"Exp num": trial.exp_num, "Epoch": epoch_cell(trial, space.budget.epochs),
                  "initial lr": f"{float(lr):.3e}" if lr else MISSING})
    cells.update({column: format_value(metric, trial.latest(metric)) for column, metric in COST_COLUMNS.items()})
    scores = trial.at(trial.best_epoch(space.metric, space.mode))
    cells.update({key: format_value(key, scores.get(key)) for key in METRIC_COLUMNS})
    return [cells[column] for column in COLUMNS]


def ranked(trials: Sequence[TrialRecord], space: Space) -> list[TrialRecord]:
    """Trials by val/bbox_mAP (at each one's best epoch), best first; trials without a score last."""
    def key(trial: TrialRecord) -> float:
        value = trial.at(trial.best_epoch(space.metric, space.mode)).get(SORT_METRIC)
        return -value if value is not None else math.inf

    return sorted(trials, key=key)


# --- the effect of each searched knob -------------------------------------------------------------------

def knob_groups(space: Space, trials: Sequence[TrialRecord], knob: str) -> list[Group]:
    """The trials' best scores grouped by the knob's value (a choice) or by range (a continuous knob)."""
    scored = [(trial.params[knob], shown(space.metric, score)) for trial in trials
              if knob in trial.params and (score := trial.score(space.metric, space.mode)) is not None]
    distribution = space.space[knob]
    if isinstance(distribution, Choice | Grid):
        order = [param_text(value) for value in distribution.values]
        return [Group(label, [s for v, s in scored if v == label]) for label in order
                if any(v == label for v, _ in scored)]
    return _ranges(sorted((float(v), s) for v, s in scored))


def _ranges(scored: list[tuple[float, float]]) -> list[Group]:
    """Splits (value, score) pairs, sorted by value, into up to three groups of consecutive values."""
    count = min(_BINS, len(scored))
    bounds = [round(i * len(scored) / count) for i in range(count + 1)]
    groups = []
    for start, stop in itertools.pairwise(bounds):
        chunk = scored[start:stop]
        low, high = chunk[0][0], chunk[-1][0]
        label = f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"
        groups.append(Group(label, [s for _, s in chunk]))
    return groups


def effect_line(knob: str, groups: Sequence[Group], *, metric: str, mode: str) -> str:
    """``lr: 0.002-0.005 best 3.1, mean 1.2 (n=2); ...`` (mAPs in percent)."""
    spec = ".1f" if is_map(metric) else ".3g"
    parts = [f"{g.label} best {g.best(mode):{spec}}, mean {g.mean:{spec}} (n={len(g.values)})" for g in groups]
    return f"{knob}: " + "; ".join(parts)


# --- plots ----------------------------------------------------------------------------------------------

def draw_plots(search: SearchHandle, trials: Sequence[TrialRecord], directory: Path) -> list[PlotFile]:
    """The metric per epoch of every trial, the best so far against wall time, and one plot per searched knob."""
    space = search.space
    metric, label = space.metric, _axis_label(space.metric)
    curves = [Curve(t.exp_num, [p.step for p in t.history[metric]], [shown(metric, p.value) for p in t.history[metric]],
                    cut=t.status == "stopped") for t in trials if t.history.get(metric)]
    if not curves:
        return []
    points = sorted((p.timestamp_ms, shown(metric, p.value)) for t in trials for p in t.history.get(metric, ()))
    start = min(search.parent.info.start_time, points[0][0])
    files = [plot_curves(directory / "epochs.png", curves, metric=label, max_epochs=space.budget.epochs),
             plot_best_so_far(directory / "best_so_far.png", [(t - start) / 60000 for t, _ in points],
                              [v for _, v in points], metric=label, mode=space.mode)]
    for knob in space.space:
        groups = knob_groups(space, trials, knob)
        if groups:
            files.append(plot_knob(directory / f"knob_{knob}.png", knob, groups, metric=label, mode=space.mode))
    return files


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if is_map(metric) else metric


# --- accuracy against cost: the Pareto front ------------------------------------------------------------

FINISHED = ("completed", "stopped")
"""Trials with values to compare: ASHA's stopped ones hold a checkpoint and their costs too."""


def record_values(trial: TrialRecord, space: Space) -> dict[str, float]:
    """The trial's values as the searcher was told them: scores of its best epoch, costs as last measured."""
    epochs = sorted({p.step for points in trial.history.values() for p in points})
    return trial_values([trial.at(epoch) for epoch in epochs], primary=space.metric, mode=space.mode)


def pareto_front(space: Space, trials: Sequence[TrialRecord]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Each finished trial's values by Exp num, and the Exp nums of the front of those that meet every limit."""
    values = {t.exp_num: record_values(t, space) for t in trials if t.status in FINISHED}
    return values, feasible_front(values, directions=space.directions(), constraints=space.constraints)


def draw_pareto(space: Space, trials: Sequence[TrialRecord], directory: Path) -> list[PlotFile]:
    """One plot per objective besides the primary metric: every finished trial, the front, the limits."""
    values, front = pareto_front(space, trials)
    files = []
    for other, _ in space.directions()[1:]:
        names = [name for name, v in values.items() if space.metric in v and other in v]
        if not names:
            continue
        x = Axis(_axis_label(other), [shown(other, values[n][other]) for n in names], _limits(space, other))
        y = Axis(_axis_label(space.metric), [shown(space.metric, values[n][space.metric]) for n in names],
                 _limits(space, space.metric))
        path = directory / f"pareto_{other.replace('/', '_')}.png"
        files.append(plot_pareto(path, x, y, front=[i for i, n in enumerate(names) if n in front], labels=names))
    return files


def _limits(space: Space, metric: str) -> list[float]:
    limit = space.constraints.get(metric)
    return [shown(metric, b) for b in (limit.min, limit.max) if b is not None] if limit else []


def _pareto_section(search: SearchHandle, trials: Sequence[TrialRecord], plots: Sequence[PlotFile],
                    directory: Path) -> list[str]:
    """The front's trials with their knobs and values, the limits, and the plots."""
    space = search.space
    values, front = pareto_front(space, trials)
    objectives = [metric for metric, _ in space.directions()]
    costs = [m for m in COST_METRICS if m not in objectives]
    header = ["Exp num", *space.space, *objectives, *costs]
    params = {t.exp_num: t.params for t in trials}
    rows = [[name, *(show_value(params[name].get(k, MISSING)) for k in space.space),
             *(format_value(m, values[name].get(m)) for m in [*objectives, *costs])] for name in front]
    directions = ", ".join(f"{metric} ({mode})" for metric, mode in space.directions())
    limits = "; ".join(f"{metric} {limit.text()}" for metric, limit in space.constraints.items())
    feasible = len([n for n, v in values.items() if is_feasible(v, space.constraints)])
    return ["", "## Pareto front",
            f"Objectives: {directions}. " + (f"Limits: {limits}; {feasible} of {len(values)} finished trials meet "
                                             "them. " if limits else "")
            + f"The front, {len(front)} of them: no other finished trial is as good in every objective and better "
            f"in one (MLflow: `tags.{TAG_PARETO} = 'true'`). Costs are each trial's last measurement.", "",
            *markdown_table(header, rows),
            *(f"![{p.path.stem}]({p.path.relative_to(directory).as_posix()})" for p in plots)]


# --- the dataset ----------------------------------------------------------------------------------------

def _dataset_section(card: DatasetCard | None, plot: PlotFile | None, directory: Path) -> list[str]:
    """The dataset card the search logged: a table (rows: counts, columns: splits) and objects per class."""
    if card is None:
        return []
    return ["", "## Dataset", "The annotations the trials read (`dettune validate` prints the same card).", "",
            *markdown_table(["", *card.splits], [[label, *cells] for label, cells in card.rows()]),
            *([f"![{plot.path.stem}]({plot.path.relative_to(directory).as_posix()})"] if plot else [])]


def draw_card(card: DatasetCard | None, directory: Path) -> PlotFile | None:
    if card is None:
        return None
    return plot_class_counts(directory / "objects_per_class.png", card.classes,
                             {split: [c.per_class[name] for name in card.classes] for split, c in card.splits.items()})


# --- the markdown ---------------------------------------------------------------------------------------

def render_markdown(search: SearchHandle, trials: Sequence[TrialRecord], plots: Sequence[PlotFile],
                    directory: Path, pareto_plots: Sequence[PlotFile] = (), card: DatasetCard | None = None,
                    card_plot: PlotFile | None = None, importances: Importances | None = None) -> str:
    """report.md: the write-up, the trial table, failed trials, the Pareto front (with objectives), plots, the
    dataset card and the leaderboard table."""
    space = search.space
    defaults = base_knobs(space.base)
    rows = [table_row(trial, space, defaults) for trial in ranked(trials, space)]
    lines = [f"# Results and Models: {search.name}", "", "## Experiment",
             f"Scores are each trial's best epoch by {space.metric}: the checkpoint inference would use "
             f"(`dettune export {search.name}`).", "",
             *_writeup(space, trials, search.parent.data.tags, importances), "",
             *markdown_table(COLUMNS, rows),
             *_failed(trials), *(_pareto_section(search, trials, pareto_plots, directory) if space.objectives else []),
             *_plot_links(plots, directory), *_ensemble_section(search.ensembles()),
             *_dataset_section(card, card_plot, directory),
             "", "## Leader board 결과(제출했을 시)",
             *_leaderboard(trials)]
    return "\n".join(lines) + "\n"


ENSEMBLE_COLUMNS = ("Model", "Members", FPS_COLUMN, *METRIC_COLUMNS)


def _ensemble_section(runs: Sequence[Run]) -> list[str]:
    """The best single trial, with TTA where measured, and each ``dettune ensemble`` run, on the held-out half."""
    if not runs:
        return []

    def row(model: str, members: str, metrics: Mapping[str, float], prefix: str) -> list[str]:
        return [model, members, format_value(FPS_METRIC, metrics.get(prefix + FPS_METRIC)),
                *(format_value(column, metrics.get(prefix + column)) for column in METRIC_COLUMNS)]

    latest = runs[-1]
    single = latest.data.params.get("single", MISSING)
    rows = [row("best single trial", single, latest.data.metrics, "single/")]
    with_tta = [r for r in runs if r.data.params.get("tta") == "on"]
    if with_tta:
        rows.append(row("best single trial + TTA", f"{single}+tta", with_tta[-1].data.metrics, "single_tta/"))
    for run in runs:
        params = run.data.params
        members = ", ".join(f"{m} x{w}" if w != "1" else m for m, w in zip(params.get("members", "").split(","),
                                                                            params.get("weights", "").split(","),
                                                                            strict=False))
        rows.append(row(run.info.run_name, f"{members} ({params.get('fusion', MISSING)})", run.data.metrics, ""))
    return ["", "## Ensembles",
            f"Scored on the held-out half of val ({latest.data.params.get('images.held_out', MISSING)} images; the "
            "other half chose each ensemble's members, weights and fusion settings). FPS: batch 1 on val, every "
            "member and TTA view of the ensemble plus the fusion.", "",
            *markdown_table(ENSEMBLE_COLUMNS, rows)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A centred markdown table, as the log's."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return [line(header), "|" + "|".join(":---:" for _ in header) + "|", *(line(row) for row in rows)]


def _writeup(space: Space, trials: Sequence[TrialRecord], tags: Mapping[str, str],
             importances: Importances | None) -> list[str]:
    knobs = list(space.space)
    inherited = tags.get(TAG_INHERITED)
    title = f"{space.name}: {space.metric} by {', '.join(knobs)}"
    return [f'<span style="color:blue">1. {title}</span>  ',
            f"- 실험 가설 (hypothesis) : {space.hypothesis or '~'}",
            f"- 실험 방법 (method) : {space.method or '~'}",
            f"  - search: {_setup(space)}",
            *([f"  - inherited: {'; '.join(inherited.splitlines())}"] if inherited else []),
            *([f"  - data (on_bad: skip): {left_out}; the items in the parent run's `{LEFT_OUT_FILE}`"]
              if (left_out := tags.get(TAG_LEFT_OUT)) else []),
            f"- 결과 (result) : {_best_line(space, trials)}",
            *(f"  - {effect_line(k, g, metric=space.metric, mode=space.mode)}" for k in knobs
              if (g := knob_groups(space, trials, k))),
            f"- 결과 원인 분석 (analysis) : {_analysis(importances)}",
            "- 참고 자료 (references) : ~"]


def _analysis(importances: Importances | None) -> str:
    if importances is None:
        return f"~ (which knobs mattered needs {MIN_TRIALS} scored trials and two searched knobs)"
    return f"which knobs mattered, {importances.line()}"


def _setup(space: Space) -> str:
    scheduler = space.scheduler
    stopping = (f"ASHA (grace {scheduler.grace_epochs} epoch, reduction factor {scheduler.reduction_factor})"
                if scheduler.type == "asha" else "no early stopping")
    return (f"{space.search.algorithm} over {', '.join(space.space)}; {space.budget.trials} trials of up to "
            f"{space.budget.epochs} epochs; {stopping}; {space.metric} ({space.mode})")


def _best_line(space: Space, trials: Sequence[TrialRecord]) -> str:
    scored = [t for t in trials if t.score(space.metric, space.mode) is not None]
    if not scored:
        return "no trial has reported yet"
    feasible = [t for t in scored if is_feasible(record_values(t, space), space.constraints)]
    if not feasible:
        return "no trial meets the limits yet; per knob value, best and mean of the trials:"
    pick: Callable[..., TrialRecord] = max if space.mode == "max" else min
    best = pick(feasible, key=lambda t: t.score(space.metric, space.mode))
    knobs = ", ".join(f"{k}={show_value(best.params.get(k, MISSING))}" for k in space.space)
    value = format_value(space.metric, best.score(space.metric, space.mode))
    within = " within the limits" if space.constraints else ""
    return (f"best{within} {best.exp_num}: {space.metric} {value} ({knobs}); per knob value, best and mean of the "
            "trials:")


def _failed(trials: Sequence[TrialRecord]) -> list[str]:
    failed = [t for t in trials if t.status == "failed"]
    if not failed:
        return []
    return ["", "Failed trials:", *(f"- {t.exp_num}: {t.failure or 'no reason recorded'}" for t in failed)]


def _plot_links(plots: Sequence[PlotFile], directory: Path) -> list[str]:
    if not plots:
        return []
    return ["", "### Plots", *(f"![{p.path.stem}]({p.path.relative_to(directory).as_posix()})" for p in plots)]


def _leaderboard(trials: Sequence[TrialRecord]) -> list[str]:
    scored = sorted((t for t in trials if t.latest(LB_METRIC) is not None),
                    key=lambda t: -(t.latest(LB_METRIC) or 0.0))
    if not scored:
        return ["No public leaderboard score recorded yet: `dettune lb <Exp num> --map <score>`."]
    rows = [[t.exp_num, f"{t.latest(LB_METRIC):g}", t.lb_note or ""] for t in scored]
    return markdown_table(["Exp num", "Public LB map", "Note"], rows)


# --- writing --------------------------------------------------------------------------------------------

def write_report(search: SearchHandle, out: Path, *, fmt: str = "md") -> Path:
    """Writes ``out/report.md`` with its plots (logged on the parent run under ``report/``), or ``out/report.csv``.

    The CSV holds the same rows and columns as the markdown table, plus how each trial ended.
    """
    trials = search.trials()
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return _write_csv(search, trials, out / "report.csv")
    importances = knob_importances(search.space, trials)
    plots = draw_plots(search, trials, out / "plots") + _importance_plot(importances, out / "plots")
    pareto_plots = draw_pareto(search.space, trials, out / "plots") if search.space.objectives else []
    card = search.dataset_card()
    card_plot = draw_card(card, out / "plots")
    path = out / "report.md"
    markdown = render_markdown(search, trials, plots, out, pareto_plots, card, card_plot, importances)
    path.write_text(markdown, encoding="utf-8")
    run_id = search.parent.info.run_id
    search.client.log_artifact(run_id, str(path), REPORT_ARTIFACTS)
    if importances is not None:
        stamp = int(time.time() * 1000)
        search.client.log_batch(run_id, metrics=[Metric(key, value, stamp, 0)
                                                 for key, value in importances.metrics().items()])
    for plot in [*plots, *pareto_plots, *([card_plot] if card_plot else [])]:
        search.client.log_artifact(run_id, str(plot.path), f"{REPORT_ARTIFACTS}/plots")
    return path


def _importance_plot(importances: Importances | None, directory: Path) -> list[PlotFile]:
    if importances is None:
        return []
    return [plot_importances(directory / "importances.png", importances.shares, metric=importances.metric,
                             trials=importances.trials)]


def _write_csv(search: SearchHandle, trials: Sequence[TrialRecord], path: Path) -> Path:
    space = search.space
    defaults = base_knobs(space.base)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow([*COLUMNS, "Status"])
        writer.writerows([*table_row(t, space, defaults), t.outcome] for t in ranked(trials, space))
    return path


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune report NAME [--tracking-uri URI] [--out DIR] [--format md|csv]``."""
    parser = commands.add_parser("report", help="write a search's experiment-log table, write-up and plots")
    parser.add_argument("name", help="the search's name")
    add_tracking_flag(parser)
    parser.add_argument("--out", help="output directory (default: reports/NAME)")
    parser.add_argument("--format", choices=("md", "csv"), default="md",
                        help="md: report.md with plots (default); csv: report.csv, the table alone")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` command."""
    search = open_search(open_tracking(args.tracking_uri), args.name)
    path = write_report(search, Path(args.out or Path("reports") / args.name), fmt=args.format)
    print(f"wrote {path}")
    return 0
