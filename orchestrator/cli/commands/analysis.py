"""`orch compare` and `orch ui`: looking at runs. `orch compare` reads the runs' metrics.jsonl (what `orch status`
reads) and attaches its plots to their MLflow runs; `orch ui` serves the MLflow store the runs report to.

The analysis itself is in `orchestrator.tools.compare`, imported inside the command (with numpy, matplotlib and
mlflow) so that the CLI starts fast.
"""

import ctypes  # not imported in the child before exec (`stop_with_parent`): another thread may hold the import lock
import getpass
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.core.errors import OrchError
from orchestrator.core.settings import EXPERIMENT, TRAINING_VIEW, UI_PORT, experiment_page, orch_home, tracking_uri

PR_SET_PDEATHSIG = 1  # prctl(2)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="the reference run (x1 in the distance plot)")],
    run_b: Annotated[str, typer.Argument(help="the run measured against it (x2)")],
    output: Annotated[
        Optional[Path], typer.Option(help="folder for the plots and compare.json [default: $ORCH_HOME/compare/A-vs-B]")
    ] = None,
    smooth: Annotated[
        int, typer.Option(help="centred moving-average window, in logged points (at most a tenth of a run's points)")
    ] = 50,
) -> None:
    """Plot two runs' losses and test perplexities, and how many steps apart they reach the same loss."""
    if smooth < 1:
        raise OrchError(f"Option --smooth is {smooth}. Allowed: a whole number of logged points, 1 or more.")
    from orchestrator.core.rundir import get_run

    runs = get_run(run_a), get_run(run_b)
    target = output or orch_home() / "compare" / f"{run_a}-vs-{run_b}"
    if target.exists() and not target.is_dir():
        raise OrchError(f"Option --output names {str(target)!r}, which is a file. Allowed: a folder (new or not).")
    from orchestrator.tools import compare as analysis

    histories = [analysis.read_history(run) for run in runs]
    for history in histories:
        if "loss" not in history.series:
            raise OrchError(
                f"Run {history.run_id} has no loss yet: its metrics.jsonl has none. Allowed: runs that have trained "
                "at least one step."
            )
    result = analysis.compare(histories[0], histories[1], smooth, target)
    files = [target / name for name in (*result["plots"], "compare.json")]
    logged = [analysis.log_artifacts(h, files, f"compare/{run_a}-vs-{run_b}") for h in histories]
    print_comparison(result, target, logged)


def print_comparison(result: dict[str, Any], output: Path, logged: list[str]) -> None:
    runs, window = result["runs"], result["smooth_window"]
    smoothed = f"smoothed, window {window}"
    table = Table("", "run", "points", "last step", "loss", smoothed, "val ppl", title="final values (metrics.jsonl)")
    table.columns[1].no_wrap = True
    for label, run in runs.items():
        ppl = run["final_val_perplexity"]
        table.add_row(
            label.upper(),
            run["run_id"],
            str(run["points"]),
            str(run["last_step"]),
            f"{run['final_loss']:.4f}",
            f"{run['final_smoothed_loss']:.4f}",
            f"{ppl:.2f}" if ppl is not None else "-",
        )
    console.print(table)
    if window < result["smooth_asked"]:
        console.print(
            f"Smoothed over {window} points, not --smooth {result['smooth_asked']}: a window spans at most a tenth of "
            "the shorter run's points (and an odd number, centred on its point).",
            soft_wrap=True,
        )
    if result["median_distance"] is None:
        console.print(f"B never reaches a smoothed loss of A (window {window}).")
    else:
        ahead = "more" if result["median_offset"] >= 0 else "fewer"
        console.print(
            f"Median distance for the same smoothed loss: [bold]{result['median_distance']:g} steps[/] "
            f"(B needs {abs(result['median_offset']):g} {ahead} steps than A; over {result['points_reached']} of "
            f"A's {result['points_a']} points, window {result['smooth_window']}).",
            soft_wrap=True,
        )
    for line in [*result["notes"], *logged]:
        console.print(line, soft_wrap=True, highlight=False)
    console.print(f"Plots and compare.json in {output}", soft_wrap=True, highlight=False)


@app.command()
def ui(
    port: Annotated[
        int, typer.Option(help="port to serve on; pick another when a colleague's server holds it")
    ] = UI_PORT,
    host: Annotated[str, typer.Option(help="interface to bind; 127.0.0.1 keeps it to this machine")] = "127.0.0.1",
    profile: Annotated[str, typer.Option(help="the profile whose runs to show (its tracking_uri)")] = "local",
) -> None:
    """The MLflow UI for your runs: serves the embedded store here, or points at the remote tracking server."""
    from orchestrator.core.loading import load_profile

    uri = tracking_uri(load_profile(profile)[1].tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(
            f"Runs report to the tracking server {uri}: open {uri.rstrip('/')}/#/experiments?{TRAINING_VIEW} "
            f"(MLflow's \"Model training\" view), experiment '{EXPERIMENT}'.",
            soft_wrap=True,
            highlight=False,
        )
        return
    if not uri.startswith("sqlite:///"):
        raise OrchError(
            f"MLFLOW_TRACKING_URI is {uri!r}, which orch ui cannot serve. Allowed: an http(s):// tracking server "
            "(orch ui prints its address) or a sqlite:/// store (orch ui serves it)."
        )
    if not 1 <= port <= 65535:
        raise OrchError(f"Option --port is {port}. Allowed: a port number from 1 to 65535 (1024 and up without root).")
    check_port_free(host, port)
    print_addresses(uri, ensure_store(uri), host, port)
    sys.stdout.flush()
    start_sync_follower()
    # One worker is plenty for one person and light on a shared login node.
    command = ["mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    os.execv(sys.executable, [sys.executable, "-m", *command])


def ensure_store(uri: str) -> str:
    """A store with the experiment runs report to, created when it is new: jobs of a spooling profile never create
    it (this command's follower is the store's writer), and a user who opens the UI before the first metric sees an
    empty experiment rather than an error."""
    from jobs.tracking import client_for, training_experiment

    database = Path(uri.removeprefix("sqlite:///"))
    new = not database.is_file()
    experiment_id = training_experiment(client_for(uri), uri)
    if new:
        console.print(f"Created the tracking store {database}: no run has reported to it yet.", soft_wrap=True)
    return experiment_id


def start_sync_follower() -> None:
    """`orch sync --follow` beside the server, so that the store it serves gets the metrics of runs whose jobs only
    spool them (one writer); the kernel stops it when the server's process ends."""
    command = [sys.executable, "-m", "orchestrator", "sync", "--follow"]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=stop_with_parent)


def stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (here, the process that becomes the server) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def check_port_free(host: str, port: int) -> None:
    """Bind the port as the server will (address reuse on, so a port left in TIME_WAIT counts as free)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OrchError(
                f"Cannot serve on {host}:{port}: {err.strerror}. On a shared login node another user may hold the "
                "port. Allowed: a free port, chosen with --port."
            ) from None


def print_addresses(uri: str, experiment_id: str, host: str, port: int) -> None:
    """Where to point a browser, and the SSH tunnel that reaches this machine's loopback from a laptop."""
    import socket

    page = experiment_page(experiment_id)
    shown = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    console.print(f"Serving {uri} with the MLflow UI (Ctrl+C stops it).", soft_wrap=True, highlight=False)
    console.print(f"Open: http://{shown}:{port}/{page}", soft_wrap=True, highlight=False)
    console.print(
        f"The runs of experiment '{EXPERIMENT}' in MLflow's \"Model training\" view; a run's charts are in its "
        '"Model metrics" tab, whose address `orch status RUN` prints.',
        soft_wrap=True,
        highlight=False,
    )
    if host in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"From a laptop: ssh -N -L {port}:localhost:{port} {getpass.getuser()}@{socket.getfqdn()} "
            f"then open http://localhost:{port}/{page}",
            soft_wrap=True,
            highlight=False,
        )
