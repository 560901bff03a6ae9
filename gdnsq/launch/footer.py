"""The last lines a run prints: where its checkpoint, plots and MLflow run are, and the command that loads the
registered model (or exports the checkpoint) with this install's interpreter."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .console import show, verbosity


def footer(cfg, summary: dict) -> None:
    """Where things are: checkpoint, plots, the MLflow UI command, and how to load the registered model."""
    if verbosity() < -1:
        return
    rows = []
    ckpt = summary.get("checkpoint")
    if ckpt:
        ckpt = str(ckpt)
        if Path(ckpt).is_dir() and (Path(ckpt) / "checkpoint.pt").is_file():
            ckpt = str(Path(ckpt) / "checkpoint.pt")
        rows.append(("checkpoint", ckpt))
    uri = None
    if cfg.tracking.enabled and summary.get("mlflow_run_id"):
        from ..tracking.names import scrub_value
        from ..tracking.store import is_server_uri, resolve_tracking_uri, run_artifact_uri

        uri = resolve_tracking_uri(cfg.tracking.uri)
        artifacts = run_artifact_uri(uri, summary["mlflow_run_id"])
        if artifacts:
            local = Path(artifacts.removeprefix("file://"))
            pngs = sorted(p.name for p in local.glob("*.png")) if local.is_dir() else []
            rows.append(
                ("plots", f"{local if local.is_dir() else artifacts}" + (f"  ({', '.join(pngs)})" if pngs else ""))
            )
        rows.append(("MLflow run", summary["mlflow_run_id"]))
        rows.append(
            (
                "MLflow UI",
                f"open {scrub_value(uri)}"
                if is_server_uri(uri)
                else f"mlflow ui --backend-store-uri {uri}   # then http://127.0.0.1:5000",
            )
        )
    if summary.get("registered_model"):
        ref = summary["registered_model"].split()[0]
        if "(champion)" in summary["registered_model"]:
            ref = ref.rsplit("/", 1)[0] + "@champion"
        rows.append(("registered", summary["registered_model"]))
        tracking = (
            ""
            if uri is None or os.environ.get("MLFLOW_TRACKING_URI") == uri or _is_default(uri)
            else f", tracking_uri={uri!r}"
        )
        # The interpreter of this install: a bare `python` is the system's, which has no gdnsq after `make`.
        python = shlex.quote(sys.executable)
        rows.append(("load it", f"{python} -c \"import gdnsq; m = gdnsq.load_model('{ref}'{tracking})\""))
    elif ckpt and "://" not in ckpt:
        rows.append(("export it", f"{gdnsq_command()} export {ckpt} --out out/export"))
    for key, value in rows:
        show(f"  {key:<11} {value}")


def gdnsq_command() -> str:
    """How to call gdnsq from a shell: ``gdnsq`` when this install's is on PATH, else its full path (``make``
    leaves it in .venv/bin, off PATH), else through this interpreter."""
    import shutil

    here = Path(sys.executable).parent / "gdnsq"
    if shutil.which("gdnsq") == str(here):
        return "gdnsq"
    return shlex.quote(str(here)) if here.is_file() else f"{shlex.quote(sys.executable)} -m gdnsq.cli"


def _is_default(uri: str) -> bool:
    return uri == f"sqlite:///{Path(os.getcwd()).resolve() / '.gdnsq' / 'mlflow.db'}"
