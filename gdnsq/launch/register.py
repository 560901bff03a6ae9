"""Registering a trained run's student: one function for a Ray Train run and a sweep's best trial.

Layer order: ``errors/config -> quant -> data -> training -> tracking -> export -> launch -> cli``.
Registration is a launch-time step (the driver decides, after the run, whether and what to register),
and the registry card's size and BOPs figures must be the exporter's own (one counter, one packed
size: the figures ``gdnsq export`` reports for the same model). So ``export`` sits below ``launch``:
``launch`` may import ``export`` (and ``tracking``), and nothing in ``gdnsq/export/`` imports ``launch``
(checked by grep when this order was set).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from ..config import JobConfig
from ..errors import ExportError, RegistryError

log = logging.getLogger("gdnsq")


def packed_stats(student: torch.nn.Module, state: dict, example_input: torch.Tensor) -> dict | None:
    """The exporter's report for ``student`` (``bytes_file``, ``bytes_fp32``, ``compression``, ``macs``,
    ``bops``, per-layer rows), from a packed file written to a temporary folder and dropped; None, with
    a warning, when the student cannot be packed (the registry then estimates them)."""
    from ..export import export_packed, recipe_from_config
    from ..export.recipe import plan_of

    io = state["io"]
    recipe = recipe_from_config(state["config"], io["num_classes"], io["input_shape"][0], plan_of(student))
    with tempfile.TemporaryDirectory(prefix="gdnsq-register-") as tmp:
        try:
            report = export_packed(student, Path(tmp) / "model.gdnsq", example_input=example_input, recipe=recipe)
        except ExportError as e:
            log.warning("no packed size for the registry card: %s", e)
            return None
    report.pop("path", None)  # the temporary file is gone
    return report


def registrable(summary: dict, what: str) -> bool:
    """Only a model that converged to its bit targets is registered (logged when not); callers may ask
    first to skip reading a checkpoint that will not be registered."""
    if not summary.get("converged"):
        log.info("not registering %s: the quantized model did not converge to its bit targets", what)
        return False
    return True


def register_checkpoint(
    cfg: JobConfig,
    state: dict,
    summary: dict,
    run_id: str,
    *,
    what: str,
    checkpoint_path: str | None = None,
    tags: dict[str, str] | None = None,
) -> str | None:
    """Register the best-or-last student of checkpoint ``state`` to MLflow run ``run_id``, champion rule.

    ``summary`` is the run's (``converged``, ``ns_top1``, ... ; the registry card and champion rule read
    it); a model that did not converge is not registered. ``what`` names the run in log lines; ``tags`` are
    added to the version's (a sweep's ``sweep`` and ``pareto_front``).
    Returns ``NAME/VERSION`` (+ `` (champion)``), or None: a registry failure is logged, not raised,
    since the trained run stands and its checkpoint (``checkpoint_path``) can be registered later.
    """
    if not registrable(summary, what):
        return None
    from ..tracking.registry import register_model
    from ..training.checkpoint import student_from_checkpoint

    student, _, _ = student_from_checkpoint(state)
    example = torch.zeros(1, *state["io"]["input_shape"])
    try:
        res = register_model(
            student,
            cfg,
            summary,
            example,
            tracker_or_run_id=run_id,
            stats=packed_stats(student, state, example),
            name=cfg.tracking.registered_name,
            tracking_uri=cfg.tracking.uri,
            tags=tags,
        )
    except RegistryError as e:
        log.warning("registering %s failed (%s); the checkpoint %s is kept", what, e, checkpoint_path)
        return None
    return f"{res['name']}/{res['version']}" + (" (champion)" if res["champion"] else "")
