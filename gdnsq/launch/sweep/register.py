"""Registering a sweep's trials: the best one under the champion rule, and in a front sweep (over
``quant.budget.*``) every converged trial, tagged with its front membership."""

from __future__ import annotations

import logging

from .pareto import front_tags, is_front_sweep
from .plan import SweepPlan, trial_config
from .report import best_trial

log = logging.getLogger("gdnsq")


def register_trials(
    summary: dict, run_summaries: dict[str, dict], base: dict, plan: SweepPlan, trials_dir: str
) -> str | None:
    """Register the best trial; in a front sweep (over ``quant.budget.*``) every converged trial that ran to the
    end too, the best last (so its champion mark is final), each tagged ``sweep`` and with its front membership
    (:func:`gdnsq.launch.sweep.pareto.front_tags`). Sets each row's ``registered``; returns the best's NAME/VERSION."""
    best = best_trial(summary)
    rows = [best] if best is not None else []
    if is_front_sweep(plan.sweep.space):
        done = [r for r in summary["trials"] if r["status"] == "completed" and r["test_converged"]]
        rows = [r for r in done if r is not best] + rows
    for r in rows:
        ref = register_trial(
            r,
            run_summaries.get(r["trial_id"]),
            base,
            plan.sweep.name,
            trials_dir,
            front_tags(r, plan.sweep.name, summary.get("front")),
        )
        # only the best's "(champion)" is final: a version registered before it may have lost the alias
        r["registered"] = ref if r is best or ref is None else ref.split()[0]
    return best["registered"] if best is not None else None


def register_trial(
    row: dict,
    run_summary: dict | None,
    base: dict,
    sweep_name: str,
    trials_dir: str,
    tags: dict[str, str] | None = None,
) -> str | None:
    """Register a trial's best state under the champion rule (:func:`register_checkpoint`), with extra version
    ``tags``."""
    from ray.train import Checkpoint

    from ..ray_worker import load_ray_checkpoint
    from ..register import register_checkpoint

    what = f"{'the best ' if row.get('best') else ''}trial {row['trial_id']}"
    if not (row.get("ns_top1") or 0) > 0:  # the table's own rule: only converged models score
        log.info("not registering: %s did not converge to its bit targets", what)
        return None
    if not row.get("checkpoint"):
        log.warning("not registering %s: it has no checkpoint", what)
        return None
    cfg = trial_config(base, row["params"], sweep_name, row["trial_id"], trials_dir)
    state = load_ray_checkpoint(Checkpoint(row["checkpoint"]))
    if not state.get("mlflow_run_id"):
        log.warning("not registering %s: its run never reached MLflow", what)
        return None
    # A trial stopped early has no test-split summary: it competes with its best validation epoch.
    summary = run_summary or {k: row[k] for k in ("ns_top1", "top1", "avg_bits_w", "avg_bits_a", "converged")}
    return register_checkpoint(
        cfg, state, summary, state["mlflow_run_id"], what=what, checkpoint_path=row["checkpoint"], tags=tags
    )
