"""The run report: `sdpo report RUN_DIR` turns a finished run's summary and step logs into
`report.md` and three plots under `plots/` (four when the split was cut by score or a selection
dropped pairs: `scores.png`). Pure Python and matplotlib, no Ray.

What it shows is what sDPO claims: each stage's reference M_{t-1} is better aligned than the base
model M_0, so γ = log π(y_w|x) − log π(y_l|x) under the reference (γ_ref) should rise stage over stage
relative to γ under the base (γ_base) — the paper's Figure 2 — and held-out accuracy should follow.
Every file is read and written through fsspec, so RUN_DIR may be local or `s3://bucket/run`.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SUMMARY = "summary.json"
STEP_LOG = "trainer_log.jsonl"  # the same name as `worker.STEP_LOG`; not imported, worker imports Ray
MISSING = "–"


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the file."""


@dataclass(frozen=True)
class Report:
    markdown_path: str
    plots: list[str]
    table: str


# --------------------------------------------------------------------------------------------------
# Reading the run: summary.json and the per-stage step logs, through fsspec
# --------------------------------------------------------------------------------------------------
def join(run_dir: str, *parts: str) -> str:
    return posixpath.join(run_dir.rstrip("/"), *parts)


def read_summary(run_dir: str) -> dict:
    path = join(run_dir, SUMMARY)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise ReportError(f"{path}: no such file; is {run_dir} a directory written by `sdpo run`?")
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        try:
            summary = json.load(f)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise ReportError(f"{path}: expected an object with a 'stages' list, as `sdpo run` writes")
    return summary


def read_step_log(run_dir: str, index: int) -> list[dict] | None:
    """One stage's `trainer_log.jsonl` as a list of step records; None when the stage has none."""
    path = join(run_dir, "stages", str(index), STEP_LOG)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return None
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: a line is not valid JSON ({err})") from None


def write_bytes(path: str, data: bytes) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------------------------------
# The stage table: one row per stage, plus row "0 (base)" from stage 1's `before/eval/*`
# --------------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """How every number in the report is written: ints as is, floats to 4 decimals, missing as `–`."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metric(key: str) -> Callable[[dict], Any]:
    return lambda stage: (stage.get("metrics") or {}).get(key)


def cache_status(stage: dict) -> Any:
    return ((stage.get("cache") or {}).get("reference") or {}).get("status")


COLUMNS: list[tuple[str, Callable[[dict], Any]]] = [
    ("stage", lambda s: s.get("index")),
    ("partition", lambda s: s.get("partition")),
    ("pairs", lambda s: s.get("num_pairs")),
    ("loss", lambda s: (s.get("loss") or {}).get("type")),
    ("γ_ref mean", metric("gamma_ref/mean")),
    ("γ_ref median", metric("gamma_ref/median")),
    ("γ_base mean", metric("gamma_base/mean")),
    ("first-step loss", metric("first_step_loss")),
    ("final train loss", metric("final/loss")),
    ("eval reward acc (vs base)", metric("eval/reward_accuracy")),
    ("eval reward acc (vs ref)", metric("eval/reward_accuracy_vs_ref")),
    ("eval ranking acc", metric("eval/ranking_accuracy")),
    ("eval margin (vs base)", metric("eval/margin")),
    ("eval logps chosen", metric("eval/logps_chosen")),
    ("eval logps rejected", metric("eval/logps_rejected")),
    ("eval loss (vs base)", metric("eval/loss")),
    ("ref cache (hit/miss)", cache_status),
]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def from_base(summary: dict) -> list[dict]:
    """Row "0 (base)" — stage 1's `before/eval/*` as a pseudo-stage's `eval/*` — then the stages."""
    if not summary["stages"]:
        return []
    before = (summary["stages"][0].get("metrics") or {}).items()
    base = {k.removeprefix("before/"): v for k, v in before if k.startswith("before/eval/")}
    return [{"index": "0 (base)", "metrics": base}] + summary["stages"]


def stage_table(summary: dict) -> str:
    rows = [[get(s) for _, get in COLUMNS] for s in from_base(summary)]
    return markdown_table([h for h, _ in COLUMNS], rows)


def sources(summary: dict) -> list[str]:
    """Data sources with their own held-out keys `eval/<source>/<metric>`."""
    keys = {k for s in summary["stages"] for k in (s.get("metrics") or {})}
    return sorted({k.split("/")[1] for k in keys if k.startswith("eval/") and k.count("/") == 2})


def eval_series(summary: dict, key: str) -> list[float]:
    """A held-out metric from stage 0 (the base, stage 1's `before/`) to T; NaN where missing."""
    values = [metric(f"eval/{key}")(s) for s in from_base(summary)]
    return [math.nan if v is None else float(v) for v in values]


SOURCE_METRICS = ["reward_accuracy", "reward_accuracy_vs_ref", "ranking_accuracy", "margin",
                  "logps_chosen", "logps_rejected"]


def source_table(summary: dict) -> str:
    rows = [[s["index"], src] + [metric(f"eval/{src}/{m}")(s) for m in SOURCE_METRICS]
            for s in from_base(summary) for src in sources(summary)]
    return markdown_table(["stage", "source"] + SOURCE_METRICS, rows)


# --------------------------------------------------------------------------------------------------
# Plots: each a function summary (+ logs) -> Figure or None when there is nothing to draw
# --------------------------------------------------------------------------------------------------
def png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def training_figure(summary: dict, logs: dict[int, list[dict] | None]) -> Figure | None:
    """Loss and reward accuracy per optimiser step, stages concatenated, a line at each boundary."""
    if not any(logs.values()):
        return None
    fig = Figure(figsize=(10, 6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    offset = 0
    for stage in summary["stages"]:
        entries = logs.get(stage["index"]) or []
        for ax in (loss_ax, acc_ax):
            ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(offset + 0.5, 1.01, f" stage {stage['index']}", transform=ax.get_xaxis_transform(),
                    fontsize=8, color="grey")
        steps = [offset + e.get("step", n) for n, e in enumerate(entries, 1)]
        style = {"marker": "." if len(entries) < 100 else None}  # a few points per stage in small runs
        loss_ax.plot(steps, [e.get("loss", math.nan) for e in entries], color="C0", **style)
        acc_ax.plot(steps, [e.get("rewards/accuracies", math.nan) for e in entries], color="C1", **style)
        # a stage without a log still takes its steps on the axis, so later boundaries stay true
        offset = max(steps, default=offset + int(metric("steps")(stage) or 0))
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("reward accuracy (batch)")
    acc_ax.set_xlabel("optimiser step (all stages)")
    return fig


def histogram(stage: dict, which: str) -> dict | None:
    hist = (stage.get("gamma") or {}).get(which)
    ok = isinstance(hist, dict) and len(hist.get("edges") or []) == len(hist.get("counts") or []) + 1
    return hist if ok and hist["counts"] else None


GAMMA_BARS = ["gamma_ref/mean", "gamma_ref/median", "gamma_base/mean", "gamma_base/median"]


def gamma_figure(summary: dict) -> Figure | None:
    """The sDPO paper's Figure 2: γ under the stage's reference against γ under the base model."""
    stages = summary["stages"]
    values = {k: [metric(k)(s) for s in stages] for k in GAMMA_BARS}
    with_hist = [s for s in stages if histogram(s, "ref") or histogram(s, "base")]
    if not with_hist and all(v is None for vs in values.values() for v in vs):
        return None
    fig = Figure(figsize=(max(8, 3.5 * len(with_hist)), 7 if with_hist else 4), layout="constrained")
    grid = fig.add_gridspec(2 if with_hist else 1, max(1, len(with_hist)))
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / len(GAMMA_BARS)
    for i, key in enumerate(GAMMA_BARS):
        xs = [s["index"] + (i - 1.5) * width for s in stages]
        heights = [math.nan if v is None else v for v in values[key]]
        bars.bar(xs, heights, width, label=key.replace("gamma_", "γ_"), color=f"C{i // 2}",
                 alpha=1.0 if key.endswith("mean") else 0.55)  # ref blue, base orange; medians lighter
    bars.set_xticks([s["index"] for s in stages], [f"stage {s['index']}\n{s.get('partition', '')}"
                                                   for s in stages])
    bars.set_ylabel("γ = log π(y_w|x) − log π(y_l|x)")
    bars.axhline(0, color="black", linewidth=0.6)
    bars.legend(fontsize=8)
    for col, stage in enumerate(with_hist):
        ax = fig.add_subplot(grid[1, col])
        for which, color in (("ref", "C0"), ("base", "C1")):
            if hist := histogram(stage, which):
                ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.4, color=color,
                          label=f"γ_{which}")
        ax.set_title(f"stage {stage['index']}: γ over its partition", fontsize=9)
        ax.legend(fontsize=8)
    return fig


def heldout_figure(summary: dict) -> Figure | None:
    """Held-out metrics from stage 0 (base) to T; per-source lines dashed when there are several."""
    if not summary["stages"] or all(math.isnan(v) for v in eval_series(summary, "ranking_accuracy")):
        return None
    xs = list(range(len(summary["stages"]) + 1))
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    acc_ax, logp_ax = fig.subplots(1, 2)
    panels = [(acc_ax, [("reward_accuracy", "reward acc (vs base)"),
                        ("reward_accuracy_vs_ref", "reward acc (vs ref)"), ("ranking_accuracy", "ranking acc")]),
              (logp_ax, [("logps_chosen", "logps chosen"), ("logps_rejected", "logps rejected")])]
    per_source = sources(summary) if len(sources(summary)) > 1 else []
    for ax, curves in panels:
        for i, (key, label) in enumerate(curves):
            ax.plot(xs, eval_series(summary, key), marker="o", color=f"C{i}", label=label)
            for j, src in enumerate(per_source):
                ax.plot(xs, eval_series(summary, f"{src}/{key}"), linestyle="--", marker="osv^D"[j % 5],
                        markersize=4, color=f"C{i}", alpha=0.7, label=f"{label} [{src}]")
        ax.set_xticks(xs, ["0 (base)"] + [str(x) for x in xs[1:]])
        ax.set_xlabel("after stage")
        ax.legend(fontsize=7)
    acc_ax.set_ylabel("held-out accuracy")
    logp_ax.set_ylabel("held-out mean log π(y|x)")
    return fig


SCORE_LABELS = {"easy_to_hard": "γ under the base model (high = easy)", "hard_to_easy": "γ under the base model (high = easy)",
                "score_column": "the rows' own score", "learnability": "learnability (L_init − L_ft) / L_init"}


def scores_figure(summary: dict) -> Figure | None:
    """Score strategies and selections: each score's distribution per stage (and over the dropped pairs)."""
    record = summary.get("scores") or {}
    panels = [(which, per) for which, per in (record.get("histograms") or {}).items()
              if any(h.get("counts") for h in per.values())]
    if not panels:
        return None
    fig = Figure(figsize=(9, 3.5 * len(panels)), layout="constrained")
    for ax, (which, per) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        for i, (name, hist) in enumerate(per.items()):
            if hist.get("counts") and len(hist["edges"]) == len(hist["counts"]) + 1:
                ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.35, color="grey" if name == "_dropped"
                          else f"C{i}", label=f"{'dropped' if name == '_dropped' else name} ({sum(hist['counts'])} pairs)")
        label = SCORE_LABELS["learnability"] if which == "learnability" else SCORE_LABELS.get(record.get("strategy"), which)
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    return fig


def ordering_lines(summary: dict) -> list[str]:
    """The ordering and selection section of report.md: what the split was cut on, what was dropped and where."""
    record = summary.get("scores") or {}
    if not record:
        return []
    order = "highest first" if record.get("descending", True) else "lowest first"
    lines = ["## Ordering and selection", "", f"- Partitions cut by `{record.get('strategy')}` ({order})."]
    for role in ("base_pass", "probe_pass"):
        if entry := record.get(role):
            lines.append(f"- {role.replace('_', ' ')}: cache {entry.get('status')} (`{entry.get('path')}`).")
    if sel := record.get("selection"):
        by_source = ", ".join(f"{src} {n}" for src, n in sorted(sel.get("dropped_by_source", {}).items()))
        lines.append(f"- Selection `{sel['strategy']}` (top {sel['top_fraction']:.0%}, loss `{sel['loss']}`): kept "
                     f"{sel['kept']} training pairs, dropped {sel['dropped']} ({by_source}); every dropped pair is "
                     f"listed with its source, file, line, scores and reason in `{sel['dropped_pairs_file']}`.")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# report.md and the entry point
# --------------------------------------------------------------------------------------------------
PLOTS = {"training": "Training loss and reward accuracy",
         "gamma": "γ under the reference and the base model",
         "heldout": "Held-out metrics per stage",
         "scores": "Per-pair scores by stage (and over the dropped pairs)"}

WHAT_TO_LOOK_FOR = (
    "γ_ref is the reference model's preference for the chosen over the rejected answer, summed over "
    "completion tokens, on the stage's own partition. In sDPO the reference of stage t is the model of "
    "stage t−1, so **γ_ref mean should rise stage over stage relative to γ_base**: the reference is better "
    "aligned, which makes it a tighter, harder lower bound for the DPO objective. Held-out reward and ranking "
    "accuracy should rise from row 0 (base) onwards. Chosen log-probs typically *fall* under DPO as well: the "
    "margin grows because rejected log-probs fall faster, not because chosen answers become more likely."
)


def notes(summary: dict, plots: dict[str, str | None], logs: dict[int, list[dict] | None]) -> list[str]:
    stages = summary["stages"]
    out = []
    if no_gamma := [s["index"] for s in stages if not (histogram(s, "ref") or histogram(s, "base"))]:
        out.append(f"No γ histograms recorded for stage(s) {no_gamma} (older run or online reference).")
    if no_cache := [s["index"] for s in stages if cache_status(s) is None]:
        out.append(f"No reference cache entry for stage(s) {no_cache} "
                   "(older run or `reference.mode: online`).")
    if no_log := [i for i, log in logs.items() if not log]:
        out.append(f"No `{STEP_LOG}` for stage(s) {no_log}; those stages are missing from training.png.")
    out += [f"{name}.png not drawn: nothing to plot in this run." for name, p in plots.items() if p is None]
    return out


def gamma_gaps(summary: dict) -> str:
    ref, base = metric("gamma_ref/mean"), metric("gamma_base/mean")
    parts = [f"stage {s['index']}: {format_value(ref(s) - base(s))}" for s in summary["stages"]
             if ref(s) is not None and base(s) is not None]
    return f"γ_ref mean − γ_base mean by stage: {', '.join(parts)}." if parts else ""


def markdown(summary: dict, table: str, plots: dict[str, str | None], logs: dict) -> str:
    lines = [f"# sDPO run report: {summary.get('job', '?')}", "",
             f"Base model `{summary.get('base_model', '?')}`; {len(summary['stages'])} stage(s); "
             f"final model `{summary.get('final_model')}`.", "", "## Stages", "", table]
    bullets = [f"- {n}" for n in notes(summary, plots, logs)]
    lines += ["", *bullets, ""] if bullets else [""]
    if len(sources(summary)) > 1:
        lines += ["## Held-out pairs by source", "", source_table(summary), ""]
    lines += ["## What to look for", "", WHAT_TO_LOOK_FOR, ""]
    lines += [gamma_gaps(summary), ""] if gamma_gaps(summary) else []
    lines += ordering_lines(summary)
    lines += ["## Plots", ""]
    lines += [f"![{PLOTS[name]}](plots/{name}.png)\n" for name, path in plots.items() if path] or ["None drawn."]
    return "\n".join(lines)


def write_report(run_dir: str) -> Report:
    """Write `RUN_DIR/report.md` and `RUN_DIR/plots/*.png` for a run written by `sdpo run`."""
    summary = read_summary(run_dir)
    logs = {s["index"]: read_step_log(run_dir, s["index"]) for s in summary["stages"]}
    figures = {"training": training_figure(summary, logs), "gamma": gamma_figure(summary),
               "heldout": heldout_figure(summary)}
    if summary.get("scores"):  # runs cut by score or selected by learnability
        figures["scores"] = scores_figure(summary)
    plots = {name: None if fig is None else join(run_dir, "plots", f"{name}.png") for name, fig in figures.items()}
    for name, fig in figures.items():
        if fig is not None:
            write_bytes(plots[name], png_bytes(fig))
    table = stage_table(summary)
    md_path = join(run_dir, "report.md")
    write_bytes(md_path, markdown(summary, table, plots, logs).encode("utf-8"))
    return Report(markdown_path=md_path, plots=[p for p in plots.values() if p], table=table)
