"""Two runs compared the way the seed model card compares them: by how many steps apart they reach the same loss.

Each train loss curve is smoothed (a centred moving average over a window that a short run narrows, then a running
minimum so that it never rises). For every step x1 of run A, x2 is the first step at which run B's smoothed loss is as
low as A's at x1; |x1 - x2| against x1 shows whether B keeps a constant distance (a flat line), catches up or falls
behind. The numeric part is pure functions of arrays; reading histories, plotting and logging to MLflow build on them.

A run's history is its `RUN_DIR/metrics.jsonl`, what `orch status` reads: every step trained and standing (a resume or
a rollback drops the steps it undoes), also those MLflow has not been sent yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.tracking import MetricSpool
from orchestrator.core.files import write_json_atomic
from orchestrator.core.rundir import Run

KEYS = ("loss", "val_perplexity")
PLOTS = {"loss": "loss.png", "val_perplexity": "val_perplexity.png", "distance": "step_distance.png"}
WINDOW_SHARE = 10  # a smoothing window spans at most a tenth of a run's points: a wider one flattens its curve


def smoothing_window(asked: int, points: int) -> int:
    """The window used for `asked` on runs of `points` logged points: at most `asked` and a tenth of the points, odd
    so that it is centred on its point, at least 1 (no smoothing)."""
    window = max(1, min(asked, points // WINDOW_SHARE))
    return window - 1 + window % 2


def centred_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the `window // 2` on either side; near the ends as many on either side as there are.
    Centred, it follows a falling loss without the lag of a trailing mean (a straight line comes out as it went in)."""
    values = np.asarray(values, dtype=float)
    radius = min(window // 2, (len(values) - 1) // 2)
    smoothed = values.copy()
    if radius > 0:
        width = 2 * radius + 1
        smoothed[radius:-radius] = np.convolve(values, np.ones(width), "valid") / width  # each sum on its own: no drift
        for r in range(1, radius):  # the ends, with the widest windows that fit
            smoothed[r], smoothed[-1 - r] = values[: 2 * r + 1].mean(), values[-2 * r - 1 :].mean()
    return smoothed


def monotone_envelope(values: np.ndarray) -> np.ndarray:
    """Running minimum: the lowest loss reached so far, so that each loss level is reached at one first step."""
    return np.minimum.accumulate(np.asarray(values, dtype=float))


def smoothed_envelope(values: np.ndarray, window: int) -> np.ndarray:
    return monotone_envelope(centred_average(values, window))


@dataclass(frozen=True)
class StepDistance:
    """Pairs of steps with the same smoothed loss: `step_a` of run A, `step_b` where run B first reaches it."""

    step_a: np.ndarray
    step_b: np.ndarray

    @property
    def distance(self) -> np.ndarray:
        return np.abs(self.step_a - self.step_b)


def step_distance(
    steps_a: np.ndarray, envelope_a: np.ndarray, steps_b: np.ndarray, envelope_b: np.ndarray
) -> StepDistance:
    """For each step of A, the first step of B whose envelope is at or below A's there. Steps whose loss B never
    reaches are left out. Both envelopes must be non-increasing (see `monotone_envelope`)."""
    for name, envelope in (("envelope_a", envelope_a), ("envelope_b", envelope_b)):
        if np.any(np.diff(envelope) > 0):
            raise ValueError(f"{name} rises somewhere; pass it through monotone_envelope first")
    first = np.searchsorted(-np.asarray(envelope_b), -np.asarray(envelope_a), side="left")
    reached = first < len(envelope_b)
    return StepDistance(np.asarray(steps_a)[reached], np.asarray(steps_b)[first[reached]])


@dataclass(frozen=True)
class Series:
    steps: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class History:
    """One run's metric series, and the MLflow run the plots are attached to."""

    run_id: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    series: dict[str, Series]


def series_from_points(points: dict[int, float]) -> Series | None:
    """Points by step, sorted; non-finite values (a diverged step) dropped. None when nothing is left."""
    kept = sorted((step, value) for step, value in points.items() if np.isfinite(value))
    if not kept:
        return None
    steps, values = zip(*kept, strict=True)
    return Series(np.array(steps, dtype=np.int64), np.array(values, dtype=float))


def spool_series(run_dir: Path) -> dict[str, Series]:
    """The run's metrics in RUN_DIR/metrics.jsonl (every step rank 0 trained, committed or not)."""
    found = {}
    entries = MetricSpool(run_dir).entries()
    for key in KEYS:
        series = series_from_points({e["step"]: e["metrics"][key] for e in entries if key in e["metrics"]})
        if series is not None:
            found[key] = series
    return found


def store_missing(uri: str) -> bool:
    """A SQLite store that is not on this machine (a run directory copied from elsewhere): opening it would create
    an empty one."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def read_history(run: Run) -> History:
    """The run's series from RUN_DIR/metrics.jsonl, and its MLflow run."""
    state = run.mlflow
    return History(run.id, run.tracking_uri, state.run_id if state else None, spool_series(run.dir))


def figure(title: str, ylabel: str) -> tuple[Any, Any]:
    """A matplotlib figure drawn by the Agg backend (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_losses(histories: list[History], smoothed: list[np.ndarray], window: int, path: Path) -> None:
    how = f"centred mean of {window} points, lowest so far" if window > 1 else "lowest so far"
    fig, ax = figure(f"Train cross-entropy: raw (faint) and smoothed ({how})", "loss (nats per token)")
    for index, (history, envelope) in enumerate(zip(histories, smoothed, strict=True)):
        loss, color = history.series["loss"], f"C{index}"
        ax.plot(loss.steps, loss.values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(loss.steps, envelope, color=color, linewidth=2, label=f"{history.run_id} ({len(loss.steps)} points)")
    ax.legend()
    fig.savefig(path)


def plot_val_perplexity(histories: list[History], path: Path) -> None:
    fig, ax = figure("Test perplexity", "val_perplexity")
    for index, history in enumerate(histories):
        if "val_perplexity" in history.series:
            ppl = history.series["val_perplexity"]
            ax.plot(ppl.steps, ppl.values, color=f"C{index}", marker="o", markersize=3, label=history.run_id)
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path)


def plot_distance(distance: StepDistance, names: tuple[str, str], path: Path) -> None:
    fig, ax = figure(f"Steps apart for the same smoothed loss: {names[1]} vs {names[0]}", "|x1 - x2| (steps)")
    ax.set_xlabel(f"x1: step of {names[0]}")
    if len(distance.step_a):
        ax.plot(distance.step_a, distance.distance, color="C2", linewidth=1.5)
        median = float(np.median(distance.distance))
        ax.axhline(median, color="C3", linestyle="--", linewidth=1, label=f"median {median:g} steps")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"{names[1]} never reaches a loss of {names[0]}", transform=ax.transAxes, ha="center")
    fig.savefig(path)


def run_summary(history: History, envelope: np.ndarray) -> dict[str, Any]:
    loss, ppl = history.series["loss"], history.series.get("val_perplexity")
    return {
        "run_id": history.run_id,
        "mlflow_run_id": history.mlflow_run_id,
        "points": len(loss.steps),
        "last_step": int(loss.steps[-1]),
        "final_loss": float(loss.values[-1]),
        "final_smoothed_loss": float(envelope[-1]),
        "final_val_perplexity": float(ppl.values[-1]) if ppl is not None else None,
    }


def compare(history_a: History, history_b: History, asked: int, output: Path) -> dict[str, Any]:
    """Write the plots and compare.json into `output`; return what compare.json holds. Both runs need a loss; both
    are smoothed over the same window, `asked` or what the shorter run allows (`smoothing_window`)."""
    histories = [history_a, history_b]
    names = (history_a.run_id, history_b.run_id)
    window = smoothing_window(asked, min(len(h.series["loss"].steps) for h in histories))
    envelopes = [smoothed_envelope(h.series["loss"].values, window) for h in histories]
    distance = step_distance(history_a.series["loss"].steps, envelopes[0], history_b.series["loss"].steps, envelopes[1])
    output.mkdir(parents=True, exist_ok=True)
    plot_losses(histories, envelopes, window, output / PLOTS["loss"])
    plots, notes = [PLOTS["loss"]], []
    missing = [h.run_id for h in histories if "val_perplexity" not in h.series]
    if len(missing) < len(histories):
        plot_val_perplexity(histories, output / PLOTS["val_perplexity"])
        plots.append(PLOTS["val_perplexity"])
    else:
        (output / PLOTS["val_perplexity"]).unlink(missing_ok=True)  # an earlier comparison's, now out of date
    if missing:
        skipped = "" if len(missing) < len(histories) else "; the test perplexity plot is skipped"
        notes.append(f"no val_perplexity yet in {', '.join(missing)}{skipped}")
    plot_distance(distance, names, output / PLOTS["distance"])
    plots.append(PLOTS["distance"])
    offsets = distance.step_b - distance.step_a
    result = {
        "runs": {"a": run_summary(history_a, envelopes[0]), "b": run_summary(history_b, envelopes[1])},
        "smooth_window": window,
        "smooth_asked": asked,
        "distance": {
            "step_a": distance.step_a.tolist(),
            "step_b": distance.step_b.tolist(),
            "steps": distance.distance.tolist(),
        },
        "points_a": len(history_a.series["loss"].steps),
        "points_reached": len(distance.step_a),
        "median_distance": float(np.median(distance.distance)) if len(offsets) else None,
        "median_offset": float(np.median(offsets)) if len(offsets) else None,
        "plots": plots,
        "notes": notes,
    }
    write_json_atomic(output / "compare.json", result)
    return result


def log_artifacts(history: History, files: list[Path], artifact_path: str) -> str:
    """Attach the files to the run's MLflow run; returns what happened, in words (failing is not fatal)."""
    import mlflow

    uri = history.tracking_uri
    if not history.mlflow_run_id or not uri or store_missing(uri):
        return f"{history.run_id}: not logged to MLflow (no MLflow run on this machine)"
    try:
        client = mlflow.MlflowClient(uri)
        for path in files:
            client.log_artifact(history.mlflow_run_id, str(path), artifact_path)
    except Exception as err:  # noqa: BLE001 - the plots are on disk either way
        return f"{history.run_id}: not logged to MLflow ({type(err).__name__}: {err})"
    return f"{history.run_id}: logged to MLflow run {history.mlflow_run_id} under {artifact_path}/"
