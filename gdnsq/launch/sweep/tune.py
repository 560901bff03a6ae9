"""Ray Tune edge: the sweep driver, in which every trial is a full Ray Train (DDP) run.

:func:`run_sweep` validates the sweep file (:func:`gdnsq.launch.sweep.plan.load_sweep`, before Ray is
imported), runs the pre-flight on the base job, and builds the Tuner. Tune runs :func:`run_trial` per
trial, which builds the trial's JobConfig from base + sampled params and fits it with
:func:`gdnsq.launch.ray_train.fit` (Train V2's driver-function pattern; per-epoch metrics reach Tune
through ``TuneReportCallback``). Trial runs are named ``<sweep>-<trial_id>`` and live in
``<storage>/<sweep>/trials``, so a restored sweep (``resume=True``) finds and resumes them from their own
checkpoints. The workarounds for Ray's internals are in :mod:`gdnsq.launch.sweep.ray_workarounds`.

MLflow: the driver owns a parent run; each trial's run is nested under it. At the end the best trial
(by the sweep metric) is registered with the champion rule (:mod:`gdnsq.launch.sweep.register`); a sweep over
``quant.budget.*`` registers every converged trial, tagging the Pareto front's versions. The trial table
and the front are saved (:mod:`gdnsq.launch.sweep.report`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ...config import JobConfig, from_dict, to_dict
from ...errors import SweepError
from ..preflight import preflight
from ..storage import exists, read_json, storage_root, write_bytes
from .plan import SweepPlan, load_sweep, param_space, plan_concurrency, run_name, trial_config
from .register import register_trials
from .report import SUMMARY_STEM, save_summary, summarize

log = logging.getLogger("gdnsq")

STATE_FILE = "gdnsq_sweep.json"
TRIALS_DIR = "trials"


# -------------------------------------------------------------------------------------- trials


def run_trial(
    params: dict,
    *,
    base: dict,
    sweep_name: str,
    trials_dir: str,
    parent_run_id: str | None,
    controller_failure_limit: int,
) -> None:
    """Tune's function trainable: one trial = one TorchTrainer run, its epochs reported to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..console import keep_our_warnings
    from ..ray_train import fit
    from .ray_workarounds import PlacementGroupRecorder

    keep_our_warnings()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, sweep_name, trial_id, trials_dir)
    fit(
        cfg,
        callbacks=[TuneReportCallback(), PlacementGroupRecorder(cfg.name)],
        parent_run_id=parent_run_id,
        controller_failure_limit=controller_failure_limit,
    )


# -------------------------------------------------------------------------------------- driver


def _abs_paths(base: dict) -> dict:
    """Local relative paths as the driver means them (trials run with another cwd)."""
    out = json.loads(json.dumps(base))
    for section, key in (("model", "checkpoint"), ("data", "train_path"), ("data", "val_path")):
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value) and os.path.exists(value):
            out[section][key] = os.path.abspath(value)
    return out


def _create_tuner(plan: SweepPlan, trainable, storage: str, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .ray_workarounds import PlacementGroupReaper, RunToEndASHA

    s = plan.sweep
    if s.scheduler.type == "asha":
        scheduler = RunToEndASHA(
            last_epoch=plan.job.train.epochs,
            time_attr="epoch",
            max_t=plan.max_t,
            grace_period=s.scheduler.grace_period,
            reduction_factor=s.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=s.seed), concurrency  # Tune wraps it in a ConcurrencyLimiter
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a variant generator passed in: it takes its own limit.
        search_alg, limit = BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency), None
    name = s.name
    tune_config = tune.TuneConfig(
        metric=s.metric,
        mode=s.mode,
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=s.num_samples,
        max_concurrent_trials=limit,
        reuse_actors=False,  # a reused actor would outlive its Train run
        trial_name_creator=lambda t: run_name(name, t.trial_id),
        trial_dirname_creator=lambda t: run_name(name, t.trial_id),
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=[PlacementGroupReaper(name)],
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        verbose=1,
    )
    return tune.Tuner(trainable, param_space=param_space(s), tune_config=tune_config, run_config=run_config)


def run_sweep(path: str | Path, overrides: dict[str, Any] | None = None, *, resume: bool = False) -> dict:
    """Validate, run (or resume) the sweep, register the best trial; returns the sweep summary.

    A resumed sweep runs its trials with the base job saved when it started (a changed file is
    reported and ignored): its finished trials are kept, and unfinished ones resume their runs.
    """
    plan = load_sweep(path, overrides)  # before anything imports or starts Ray
    preflight(plan.job)
    storage = storage_root(plan.job)
    experiment = f"{storage.rstrip('/')}/{plan.sweep.name}"
    trials_dir = f"{experiment}/{TRIALS_DIR}"
    state_uri = f"{experiment}/{STATE_FILE}"
    state = read_json(state_uri)
    if not resume and (state is not None or exists(experiment)):
        raise SweepError(
            f"sweep.name: {plan.sweep.name!r} already exists at {experiment}; pass --resume to "
            "continue it, or choose another sweep.name"
        )

    import ray
    from ray import tune

    from ..ray_train import place

    if resume and (state is None or not tune.Tuner.can_restore(experiment)):
        raise SweepError(f"--resume: no sweep {plan.sweep.name!r} to resume at {experiment}")
    use_gpu = place(plan.job)
    concurrency = plan_concurrency(plan, use_gpu, ray.cluster_resources())

    base = _abs_paths(plan.base)
    base.setdefault("ray", {})["use_gpu"] = use_gpu
    # Trials share the cluster: an unset CPU share (None = a whole node) means 1 CPU per worker here.
    base["ray"]["cpus_per_worker"] = plan.job.ray.cpus_per_worker or 1
    if plan.job.tracking.enabled:
        from ...tracking.store import resolve_tracking_uri

        base.setdefault("tracking", {})["uri"] = resolve_tracking_uri(plan.job.tracking.uri)
    if resume:
        if state["base"] != base:
            log.warning(
                "the base job of sweep %s changed since it started; its trials keep the original one", plan.sweep.name
            )
        base = state["base"]
    job = from_dict(JobConfig, base)

    parent = _parent_tracker(job, plan, (state or {}).get("parent_run_id"))
    parent_run_id = parent.run_id if parent is not None else None
    if not resume:
        write_bytes(
            state_uri,
            json.dumps(
                {"name": plan.sweep.name, "parent_run_id": parent_run_id, "base": base, "sweep": to_dict(plan.sweep)},
                indent=1,
            ).encode(),
        )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            sweep_name=plan.sweep.name,
            trials_dir=trials_dir,
            parent_run_id=parent_run_id,
            controller_failure_limit=plan.sweep.controller_failure_limit,
        ),
        dict(plan.sweep.trial_resources),
    )
    status = "FAILED"
    try:
        if resume:
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = _create_tuner(plan, trainable, storage, concurrency)
        results = tuner.fit()
        summary, run_summaries = summarize(results, plan, trials_dir)
        summary.update(experiment=experiment, parent_run_id=parent_run_id)
        if parent_run_id:
            from ...tracking.run import close_trial_runs

            close_trial_runs(
                job.tracking.uri,
                job.tracking.experiment,
                parent_run_id,
                {r["run_name"]: r["status"] for r in summary["trials"]},
            )
        if job.tracking.enabled and job.tracking.register:
            summary["registered_model"] = register_trials(summary, run_summaries, base, plan, trials_dir)
        save_summary(summary, experiment, parent)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"  # resumable: --resume reattaches to this run
        raise
    finally:
        if parent is not None:
            parent.finish(status)


# ---------------------------------------------------------------------------------- mlflow runs


def _parent_tracker(job: JobConfig, plan: SweepPlan, run_id: str | None):
    """The sweep's MLflow run (reattached on resume); None when tracking is off."""
    if not job.tracking.enabled:
        return None
    from ...config import flatten
    from ...tracking.names import scrub_tree
    from ...tracking.run import RunTracker

    # A longer first wait than a trial's: the trials need the parent's run id before they start.
    tracker = RunTracker(
        job.tracking.uri,
        job.tracking.experiment,
        run_id=run_id,
        run_name=plan.sweep.name,
        tags={"gdnsq.sweep": plan.sweep.name},
        start_timeout=60.0,
    )
    if run_id is None:
        tracker.log_params({f"sweep.{k}": v for k, v in flatten(to_dict(plan.sweep)).items()})
        tracker.log_dict(scrub_tree(to_dict(job)), "base_job.json")
        tracker.set_tags(
            {
                "mlflow.note.content": f"GDNSQ sweep {plan.sweep.name} over {', '.join(plan.sweep.space)}; "
                f"trials are the nested runs, the table is {SUMMARY_STEM}.csv"
            }
        )
    if tracker.run_id is None:
        log.warning("MLflow store unreachable: the trials' runs will not be nested under the sweep's run")
    return tracker
