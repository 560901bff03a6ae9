"""Ray Tune edge: hyperparameter sweeps in which every trial is a full Ray Train (DDP) run.

A sweep file is a job file (the base job) plus a ``sweep:`` section::

    sweep:
      name: r18_w2a2_sweep            # Tune experiment <storage>/<name>; a trial's run is <name>-<trial_id>
      metric: val/ns_top1             # only converged models count (0 otherwise)
      mode: max
      search: random                  # grid (only grid specs) | random (grids crossed with samples) | optuna
      num_samples: 4                  # grid/random: repeats of the grid; optuna: trials
      max_concurrent_trials: 2
      scheduler: {type: asha, grace_period: 2, reduction_factor: 2, max_t: 20}
      space:                          # dotted job setting -> one distribution
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
        schedule.scale_t: {grid: [1, 2, 4]}
        objective.distill: {choice: [jeffreys, ce]}
        schedule.warmup_steps: {randint: [200, 2000]}   # upper bound exclusive, as in Tune

Everything is validated before Ray starts (:func:`load_sweep`, one-line :class:`SweepError`).
:func:`run_sweep` is the driver: Tune runs :func:`run_trial` per trial, which builds the trial's
JobConfig from base + sampled params and fits it with :func:`gdnsq.launch.ray_train.fit` (Train V2's
driver-function pattern; per-epoch metrics reach Tune through ``TuneReportCallback``). Trial runs
are named ``<sweep>-<trial_id>`` (no timestamps) and live in ``<storage>/<sweep>/trials``, so a
restored sweep (``resume=True``) finds and resumes them from their own checkpoints.

MLflow: the driver owns a parent run; each trial's run is nested under it. At the end the best
trial (by the sweep metric) is registered with the champion rule, and the trial table is saved
(CSV, JSON, PNG) next to the experiment and as artifacts of the parent run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    JobConfig,
    apply_overrides,
    from_dict,
    known_keys,
    read_yaml,
    to_dict,
)
from ..errors import ConfigError, SweepError
from .storage import exists, read_json, storage_root, write_bytes

log = logging.getLogger("gdnsq")

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
# Settings a trial may not change: its name and storage are the sweep's, resources are planned once.
FIXED_SECTIONS = ("name", "ray", "tracking")
STATE_FILE = "gdnsq_sweep.json"
SUMMARY_STEM = "sweep_summary"
TRIALS_DIR = "trials"



@dataclass(kw_only=True)
class SchedulerConfig:
    type: str = "asha"
    """asha (early-stops trials below the rung quantile) or fifo (every trial runs to the end)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor at each rung."""
    max_t: int | None = None
    """ASHA: the epoch budget; None = train.epochs (a trial that reaches train.epochs always finishes its run)."""

    def __post_init__(self):
        if self.type not in SCHEDULERS:
            raise SweepError(f"sweep.scheduler.type: must be one of {', '.join(SCHEDULERS)}, got {self.type!r}")
        if self.grace_period < 1:
            raise SweepError("sweep.scheduler.grace_period: must be >= 1")
        if self.reduction_factor <= 1:
            raise SweepError("sweep.scheduler.reduction_factor: must be > 1")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise SweepError("sweep.scheduler.max_t: must be >= sweep.scheduler.grace_period")


@dataclass(kw_only=True)
class SweepConfig:
    name: str
    """Tune experiment name (<storage>/<name>); also the prefix of every trial's run name."""
    metric: str = "val/ns_top1"
    """Reported metric that ranks trials (the scheduler's and the registry's)."""
    mode: str = "max"
    """max or min."""
    search: str = "grid"
    """grid (only {grid: [...]} specs), random (Tune's variant generator) or optuna (TPE)."""
    num_samples: int = 1
    """grid/random: repeats of the grid (each repeat samples the other specs afresh); optuna: trials."""
    seed: int = 0
    """Seed of the random / optuna searcher."""
    max_concurrent_trials: int = 1
    """Upper bound on trials running at once (lowered to what the cluster can place)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 0.1})
    """Resources of a trial's driver function only; its Train workers take ray.num_workers x ray.cpus_per_worker."""
    max_failures: int = 1
    """Tune retries of a failed trial (its Train run resumes from its latest checkpoint)."""
    controller_failure_limit: int = 2
    """Train controller failures (e.g. a worker group that cannot be placed) before the trial fails."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted job setting -> {grid|choice: [...]} or {uniform|loguniform|randint: [lo, hi]}."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise SweepError(f"sweep.name: must be a non-empty name without '/', got {self.name!r}")
        if self.mode not in ("max", "min"):
            raise SweepError(f"sweep.mode: must be max or min, got {self.mode!r}")
        if self.search not in SEARCHES:
            raise SweepError(f"sweep.search: must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        for key in ("num_samples", "max_concurrent_trials"):
            if getattr(self, key) < 1:
                raise SweepError(f"sweep.{key}: must be >= 1")
        amounts = self.trial_resources.values()
        if not any(v > 0 for v in amounts) or any(v < 0 for v in amounts):
            raise SweepError("sweep.trial_resources: needs a positive amount of some resource, e.g. {CPU: 0.1}")


@dataclass
class SweepPlan:
    """A validated sweep: the base job (as data and as a JobConfig) and the sweep section."""

    base: dict
    job: JobConfig
    sweep: SweepConfig

    @property
    def max_t(self) -> int:
        return self.sweep.scheduler.max_t or self.job.train.epochs


# ------------------------------------------------------------------------------------ validation


def _setting_type(key: str):
    """The annotated type of a dotted setting (Optional unwrapped)."""
    cls, tp = JobConfig, None
    for part in key.split("."):
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        cls = tp
    return tp


def _check_value(base: dict, key: str, value: Any) -> None:
    try:
        from_dict(JobConfig, apply_overrides(base, {key: value}))
    except ConfigError as e:
        raise SweepError(f"sweep.space.{key}: value {value!r} makes an invalid job ({e})") from None


def validate_space(space: Any, base: dict, search: str) -> None:
    """Every key a known, sweepable setting; every spec well formed; every value a valid job."""
    if not isinstance(space, dict) or not space:
        raise SweepError("sweep.space: empty; name at least one dotted setting, "
                         "e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
    valid = known_keys()
    for key, spec in space.items():
        name = f"sweep.space.{key}"
        if key not in valid:
            raise SweepError(f"{name}: unknown setting (expected a dotted job setting such as optim.lr)")
        if key.split(".")[0] in FIXED_SECTIONS:
            raise SweepError(f"{name}: cannot be swept (a trial's name, resources and tracking are the sweep's)")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise SweepError(f"{name}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                             f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}")
        kind, args = next(iter(spec.items()))
        if search == "grid" and kind != "grid":
            raise SweepError(f"{name}: search: grid takes only {{grid: [...]}}; "
                             f"use search: random or optuna for {kind}")
        if search == "optuna" and kind == "grid":
            raise SweepError(f"{name}: search: optuna cannot enumerate a grid; use {{choice: [...]}}")
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise SweepError(f"{name}: {kind} needs a non-empty list of values, got {args!r}")
            for value in args:
                _check_value(base, key, value)
            continue
        tp = _setting_type(key)
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(v, (int, float))
                                                                   and not isinstance(v, bool) for v in args)):
            raise SweepError(f"{name}: {kind} needs [lo, hi] numbers, got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise SweepError(f"{name}: {kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "randint":
            if tp not in (int, float) or not (float(lo).is_integer() and float(hi).is_integer()):
                raise SweepError(f"{name}: randint needs integer bounds on a numeric setting, got {args!r}")
            checks = (int(lo), int(hi) - 1)  # Tune's randint excludes hi
        else:
            if tp is not float:
                hint = "; use {randint: [lo, hi]}" if tp is int else ""
                raise SweepError(f"{name}: {kind} needs a real-valued setting, "
                                 f"{key} is {getattr(tp, '__name__', tp)}{hint}")
            if kind == "loguniform" and lo <= 0:
                raise SweepError(f"{name}: loguniform needs lo > 0, got {lo}")
            checks = (lo, hi)
        for value in checks:
            _check_value(base, key, value)


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict]:
    job = {k: v for k, v in overrides.items() if not k.startswith("sweep.")}
    sweep = {k[len("sweep."):]: v for k, v in overrides.items() if k.startswith("sweep.")}
    return job, sweep


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepPlan:
    """Sweep YAML + dotted overrides (``sweep.*`` ones go to the sweep section) -> a validated plan.

    Raises :class:`SweepError` without starting (or importing) Ray.
    """
    path = Path(path)
    data = read_yaml(path, "sweep", SweepError)
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict) or not data["sweep"]:
        raise SweepError(f"sweep: {path} needs a non-empty `sweep:` section next to the base job")
    sweep_data = dict(data.pop("sweep"))
    job_over, sweep_over = _split_overrides(overrides or {})
    for key, value in sweep_over.items():
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if key.startswith("space."):  # space keys are dotted settings themselves: --sweep.space.optim.lr '{...}'
            sweep_data.setdefault("space", {})[key[len("space."):]] = value
            continue
        node = sweep_data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        base = apply_overrides(data, job_over)
        job = from_dict(JobConfig, base)
    except ConfigError as e:
        raise SweepError(f"{e} (in the base job)") from None
    if not job.ray.enabled:
        raise SweepError("ray.enabled: a sweep runs every trial on Ray Train; set it true")
    try:
        sweep = from_dict(SweepConfig, sweep_data, "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    validate_space(sweep.space, base, sweep.search)
    if sweep.scheduler.type == "asha" and "train.epochs" in sweep.space:
        raise SweepError("sweep.space.train.epochs: cannot be swept with ASHA (its budget is the base job's epochs)")
    if sweep.scheduler.type == "asha" and sweep.scheduler.max_t and sweep.scheduler.max_t > job.train.epochs:
        raise SweepError(f"sweep.scheduler.max_t: {sweep.scheduler.max_t} exceeds train.epochs ({job.train.epochs})")
    return SweepPlan(base=base, job=job, sweep=sweep)


def param_space(sweep: SweepConfig) -> dict:
    """The Tune search space (flat dotted keys)."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(int(a[0]), int(a[1]))}
    return {key: make[kind](args) for key, spec in sweep.space.items() for kind, args in spec.items()}


# -------------------------------------------------------------------------------------- trials


def run_name(sweep_name: str, trial_id: str) -> str:
    """A trial's Ray Train run and MLflow run name: stable across driver restarts."""
    return f"{sweep_name}-{trial_id}"


def trial_config(base: dict, params: dict, sweep_name: str, trial_id: str, trials_dir: str) -> JobConfig:
    """Base job + sampled params; the run is named after the trial and registers nothing itself."""
    fixed = {"name": run_name(sweep_name, trial_id), "ray.storage_path": trials_dir, "tracking.register": False}
    return from_dict(JobConfig, apply_overrides(base, {**params, **fixed}))


def run_trial(params: dict, *, base: dict, sweep_name: str, trials_dir: str, parent_run_id: str | None,
              controller_failure_limit: int) -> None:
    """Tune's function trainable: one trial = one TorchTrainer run, its epochs reported to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .ray_train import fit
    from .sweep import PlacementGroupRecorder

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, sweep_name, trial_id, trials_dir)
    fit(cfg, callbacks=[TuneReportCallback(), PlacementGroupRecorder(cfg.name)], parent_run_id=parent_run_id,
        controller_failure_limit=controller_failure_limit)


# ------------------------------------------------------------------------- Ray-side helpers
# Classes on Ray Tune / Train bases are defined on first use (module __getattr__), so validating a
# sweep file needs no Ray import; pickle (tuner.pkl on restore, the Train controller) finds them here.

_RAY_CLASSES = ("RunToEndASHA", "PlacementGroupRecorder", "PlacementGroupReaper")
_KV_NAMESPACE = "gdnsq-sweep"


def _pg_key(name: str) -> bytes:
    return f"pg/{name}".encode()


def _define_ray_classes() -> None:
    if "RunToEndASHA" in globals():
        return
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune import Callback
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RunToEndASHA(ASHAScheduler):
        """ASHA on ``epoch`` that never stops a trial at its last epoch: the run then ends by itself
        (test evaluation, summary.json, MLflow run closed) instead of being killed a moment before."""

        def __init__(self, *, last_epoch: int, **kwargs):
            super().__init__(**kwargs)
            self._last_epoch = last_epoch

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)  # records the rung value
            if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._last_epoch:
                return TrialScheduler.CONTINUE
            return action

    class PlacementGroupRecorder(WorkerGroupCallback):
        """Train controller side: note the worker group's placement group id under the run's name."""

        def __init__(self, name: str):
            self.name = name

        def after_worker_group_start(self, worker_group) -> None:
            try:
                from ray.experimental.internal_kv import _internal_kv_put

                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                _internal_kv_put(_pg_key(self.name), pg.id.hex(), overwrite=True, namespace=_KV_NAMESPACE)
            except Exception as e:  # noqa: BLE001 - internal API: degrade to Ray's own cleanup
                log.warning("could not record the placement group of %s: %s", self.name, e)

    class PlacementGroupReaper(Callback):
        """Tune driver side: remove the worker placement group a stopped trial left behind.

        A scheduler stop kills the trial's actor, and with it the Train controller, before the
        controller removes its workers' placement group; Ray's detached cleaner needs the state API
        (dashboard) to notice, and without it the group stays and starves later trials (ray#54305).
        """

        def __init__(self, sweep_name: str):
            self.sweep_name = sweep_name
            self.pending: dict[str, int] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = 0
            self._reap()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial)

        def on_step_end(self, iteration, trials, **info):
            if self.pending:
                self._reap()

        def _reap(self) -> None:
            try:
                from ray._raylet import PlacementGroupID
                from ray.experimental.internal_kv import _internal_kv_get
                from ray.util.placement_group import (
                    PlacementGroup,
                    placement_group_table,
                    remove_placement_group,
                )

                table = placement_group_table()
                for trial_id, tries in list(self.pending.items()):
                    pg_hex = _internal_kv_get(_pg_key(run_name(self.sweep_name, trial_id)), namespace=_KV_NAMESPACE)
                    if pg_hex is None and tries < 20:  # no worker group yet, or not recorded: look again
                        self.pending[trial_id] = tries + 1
                        continue
                    del self.pending[trial_id]
                    entry = table.get(pg_hex.decode()) if pg_hex else None
                    if entry and entry.get("state") not in ("REMOVED", None):
                        log.info("removing the placement group left by trial %s", trial_id)
                        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_hex.decode())))
            except Exception as e:  # noqa: BLE001 - best effort; controller_failure_limit bounds the damage
                log.warning("placement group cleanup failed: %s", e)
                self.pending.clear()

    for cls in (RunToEndASHA, PlacementGroupRecorder, PlacementGroupReaper):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str):
    if name in _RAY_CLASSES:
        _define_ray_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------------------------- driver


def _abs_paths(base: dict) -> dict:
    """Local relative paths as the driver means them (trials run with another cwd)."""
    out = json.loads(json.dumps(base))
    for section, key in (("model", "checkpoint"), ("data", "train_path"), ("data", "val_path")):
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value) and os.path.exists(value):
            out[section][key] = os.path.abspath(value)
    return out


def plan_concurrency(plan: SweepPlan, use_gpu: bool, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``, lowered so every running trial's workers (+ driver) fit at once.

    Train V2 places each trial's worker group outside Tune's accounting, so Tune alone would start
    more trials than the cluster can place; their worker groups would then time out (ray#54305).
    """
    r = plan.job.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + plan.sweep.trial_resources.get("CPU", 0.0)}
    if use_gpu:
        need["GPU"] = r.num_workers + plan.sweep.trial_resources.get("GPU", 0.0)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        raise SweepError(f"ray.num_workers: one trial needs {need} but the cluster has "
                         f"{ {k: cluster.get(k, 0.0) for k in need} }; lower ray.num_workers or ray.cpus_per_worker")
    n = min(plan.sweep.max_concurrent_trials, fits)
    if n < plan.sweep.max_concurrent_trials:
        log.warning("sweep.max_concurrent_trials lowered from %d to %d: the cluster places %d trial(s) of %s at once",
                    plan.sweep.max_concurrent_trials, n, fits, need)
    return n


def _create_tuner(plan: SweepPlan, trainable, storage: str, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .sweep import PlacementGroupReaper, RunToEndASHA

    s = plan.sweep
    if s.scheduler.type == "asha":
        scheduler = RunToEndASHA(last_epoch=plan.job.train.epochs, time_attr="epoch", max_t=plan.max_t,
                                 grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor)
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
        metric=s.metric, mode=s.mode, scheduler=scheduler, search_alg=search_alg, num_samples=s.num_samples,
        max_concurrent_trials=limit, reuse_actors=False,  # a reused actor would outlive its Train run
        trial_name_creator=lambda t: run_name(name, t.trial_id),
        trial_dirname_creator=lambda t: run_name(name, t.trial_id))
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=[PlacementGroupReaper(name)],
                                failure_config=tune.FailureConfig(max_failures=s.max_failures), verbose=1)
    return tune.Tuner(trainable, param_space=param_space(s), tune_config=tune_config, run_config=run_config)


def run_sweep(path: str | Path, overrides: dict[str, Any] | None = None, *, resume: bool = False) -> dict:
    """Validate, run (or resume) the sweep, register the best trial; returns the sweep summary.

    A resumed sweep runs its trials with the base job saved when it started (a changed file is
    reported and ignored): its finished trials are kept, and unfinished ones resume their runs.
    """
    plan = load_sweep(path, overrides)  # before anything imports or starts Ray
    storage = storage_root(plan.job)
    experiment = f"{storage.rstrip('/')}/{plan.sweep.name}"
    trials_dir = f"{experiment}/{TRIALS_DIR}"
    state_uri = f"{experiment}/{STATE_FILE}"
    state = read_json(state_uri)
    if not resume and (state is not None or exists(experiment)):
        raise SweepError(f"sweep.name: {plan.sweep.name!r} already exists at {experiment}; pass --resume to "
                         "continue it, or choose another sweep.name")

    import ray
    from ray import tune

    from .ray_train import check_resources, connect, resolve_use_gpu

    if resume and (state is None or not tune.Tuner.can_restore(experiment)):
        raise SweepError(f"--resume: no sweep {plan.sweep.name!r} to resume at {experiment}")
    connect(plan.job)
    use_gpu = resolve_use_gpu(plan.job, ray.cluster_resources())
    check_resources(plan.job, use_gpu, ray.nodes())
    concurrency = plan_concurrency(plan, use_gpu, ray.cluster_resources())

    base = _abs_paths(plan.base)
    base.setdefault("ray", {})["use_gpu"] = use_gpu
    if plan.job.tracking.enabled:
        from ..tracking.run import resolve_tracking_uri

        base.setdefault("tracking", {})["uri"] = resolve_tracking_uri(plan.job.tracking.uri)
    if resume:
        if state["base"] != base:
            log.warning("the base job of sweep %s changed since it started; its trials keep the original one",
                        plan.sweep.name)
        base = state["base"]
    job = from_dict(JobConfig, base)

    parent = _parent_tracker(job, plan, (state or {}).get("parent_run_id"))
    parent_run_id = parent.run_id if parent is not None else None
    if not resume:
        write_bytes(state_uri, json.dumps({"name": plan.sweep.name, "parent_run_id": parent_run_id,
                                            "base": base, "sweep": to_dict(plan.sweep)}, indent=1).encode())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep_name=plan.sweep.name, trials_dir=trials_dir,
                             parent_run_id=parent_run_id,
                             controller_failure_limit=plan.sweep.controller_failure_limit),
        dict(plan.sweep.trial_resources))
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
            _close_trial_runs(job, parent_run_id, summary["trials"])
        best = best_trial(summary)
        if best is not None and job.tracking.enabled and job.tracking.register:
            summary["registered_model"] = register_best(best, run_summaries.get(best["trial_id"]), base,
                                                        plan.sweep.name, trials_dir)
        _save_summary(summary, experiment, parent)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"  # resumable: --resume reattaches to this run
        raise
    finally:
        if parent is not None:
            parent.finish(status)


# ------------------------------------------------------------------------------------- results


def _value(row, key: str):
    v = row.get(key) if row is not None else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def summarize(results, plan: SweepPlan, trials_dir: str) -> tuple[dict, dict[str, dict]]:
    """The sweep table: per trial its params, its best epoch's metrics (by the sweep metric), status
    (completed / stopped by the scheduler / error), epochs and time. Also returns each completed
    trial's run summary (test split), by trial id."""
    s = plan.sweep
    rows, run_summaries = [], {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]
        name = run_name(s.name, trial_id)
        df = result.metrics_dataframe
        has_rows = df is not None and len(df) > 0
        best, ckpt = None, None
        if has_rows and s.metric in df:
            scored = df[df[s.metric].notna()]
            if len(scored):
                best = scored.loc[scored[s.metric].idxmax() if s.mode == "max" else scored[s.metric].idxmin()]
        if has_rows and "checkpoint_path" in df:
            paths = df["checkpoint_path"].dropna()
            ckpt = str(paths.iloc[-1]) if len(paths) else None
        run_summary = read_json(f"{trials_dir}/{name}/summary.json")
        if run_summary is not None:
            run_summaries[trial_id] = run_summary
        status = "error" if result.error else ("completed" if run_summary is not None else "stopped")
        rows.append({
            "trial_id": trial_id, "run_name": name, "params": {k: result.config.get(k) for k in s.space},
            "status": status, "stopped_early": status == "stopped",
            "epochs": int(df["epoch"].max()) if has_rows and "epoch" in df else 0,
            "best_epoch": _value(best, "epoch"), "score": _value(best, s.metric),
            "ns_top1": _value(best, "val/ns_top1"), "top1": _value(best, "val/top1"),
            "avg_bits_w": _value(best, "bits/avg_w"), "avg_bits_a": _value(best, "bits/avg_a"),
            "converged": bool(_value(best, "val/converged") or False),
            "test_ns_top1": (run_summary or {}).get("ns_top1"), "test_top1": (run_summary or {}).get("top1"),
            "time_s": round(float(_value(df.iloc[-1], "time_total_s") or 0.0), 1) if has_rows else 0.0,
            "checkpoint": ckpt,
            "error": str(result.error).strip().splitlines()[0][:300] if result.error else None,
        })
    rows.sort(key=lambda r: r["trial_id"])
    candidates = [r for r in rows if r["score"] is not None and r["checkpoint"]]
    best_row = None
    if candidates:
        sign = 1 if s.mode == "max" else -1
        # a tie goes to the trial that ran to the end
        best_row = max(candidates, key=lambda r: (sign * r["score"], r["status"] == "completed"))
    for r in rows:
        r["best"] = r is best_row
    summary = {"name": s.name, "metric": s.metric, "mode": s.mode, "params": list(s.space), "trials": rows,
               "best_trial": best_row["trial_id"] if best_row else None,
               "counts": {k: sum(r["status"] == k for r in rows) for k in ("completed", "stopped", "error")}}
    return summary, run_summaries


def best_trial(summary: dict) -> dict | None:
    return next((r for r in summary["trials"] if r["best"]), None)


def register_best(best: dict, run_summary: dict | None, base: dict, sweep_name: str, trials_dir: str) -> str | None:
    """Register the best trial's best state (rebuilt with build_student) under the champion rule."""
    import torch
    from ray.train import Checkpoint

    from ..errors import RegistryError
    from ..tracking.registry import register_model
    from ..training.checkpoint import (
        CHECKPOINT_FILE,
        load_checkpoint,
        student_from_checkpoint,
    )

    if not (best.get("ns_top1") or 0) > 0:
        log.info("not registering: the best trial %s did not converge to its bit targets", best["trial_id"])
        return None
    cfg = trial_config(base, best["params"], sweep_name, best["trial_id"], trials_dir)
    with Checkpoint(best["checkpoint"]).as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    shape = state["io"]["input_shape"]
    student, _, _ = student_from_checkpoint(state)
    if not state.get("mlflow_run_id"):
        log.warning("not registering the best trial %s: its run never reached MLflow", best["trial_id"])
        return None
    # A trial stopped early has no test-split summary: it competes with its best validation epoch.
    summary = run_summary or {k: best[k] for k in ("ns_top1", "top1", "avg_bits_w", "avg_bits_a", "converged")}
    try:
        res = register_model(student, cfg, summary, torch.zeros(1, *shape), tracker_or_run_id=state["mlflow_run_id"],
                             name=cfg.tracking.registered_name, tracking_uri=cfg.tracking.uri)
    except RegistryError as e:
        log.warning("registering the best trial %s failed (%s); its checkpoint %s is kept",
                    best["trial_id"], e, best["checkpoint"])
        return None
    return f"{res['name']}/{res['version']}" + (" (champion)" if res["champion"] else "")


# ---------------------------------------------------------------------------------- mlflow runs


def _parent_tracker(job: JobConfig, plan: SweepPlan, run_id: str | None):
    """The sweep's MLflow run (reattached on resume); None when tracking is off."""
    if not job.tracking.enabled:
        return None
    from ..config import flatten
    from ..tracking.run import RunTracker, scrub_tree

    # A longer first wait than a trial's: the trials need the parent's run id before they start.
    tracker = RunTracker(job.tracking.uri, job.tracking.experiment, run_id=run_id, run_name=plan.sweep.name,
                         tags={"gdnsq.sweep": plan.sweep.name}, start_timeout=60.0)
    if run_id is None:
        tracker.log_params({f"sweep.{k}": v for k, v in flatten(to_dict(plan.sweep)).items()})
        tracker.log_dict(scrub_tree(to_dict(job)), "base_job.json")
        tracker.set_tags({"mlflow.note.content": f"GDNSQ sweep {plan.sweep.name} over {', '.join(plan.sweep.space)}; "
                          f"trials are the nested runs, the table is {SUMMARY_STEM}.csv"})
    if tracker.run_id is None:
        log.warning("MLflow store unreachable: the trials' runs will not be nested under the sweep's run")
    return tracker


def _close_trial_runs(job: JobConfig, parent_run_id: str, rows: list[dict]) -> None:
    """Tag each trial's run with its sweep status. Runs of trials stopped early end KILLED and those
    of failed trials FAILED: their workers died mid-run (leaving the run open for a restart that
    will not come now), so nothing else would end them."""
    from mlflow import MlflowClient

    status = {r["run_name"]: r["status"] for r in rows}
    try:
        client = MlflowClient(job.tracking.uri)
        exp = client.get_experiment_by_name(job.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'") if exp else []
        for run in runs:
            st = status.get(run.info.run_name)
            if st is None:
                continue
            client.set_tag(run.info.run_id, "gdnsq.sweep_status", st)
            if st != "completed" and run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "KILLED" if st == "stopped" else "FAILED")
    except Exception as e:  # noqa: BLE001 - bookkeeping must not fail a finished sweep
        log.warning("could not close the trials' MLflow runs: %s", e)


# ------------------------------------------------------------------------------------ summary io


def _csv_rows(summary: dict) -> tuple[list[str], list[dict]]:
    cols = ["trial_id", "status", "stopped_early", *summary["params"], "ns_top1", "top1", "avg_bits_w", "avg_bits_a",
            "converged", "best_epoch", "epochs", "test_ns_top1", "test_top1", "time_s", "best", "run_name", "error"]
    rows = [{**{k: v for k, v in r.items() if k != "params"}, **r["params"]} for r in summary["trials"]]
    return cols, [{c: r.get(c) for c in cols} for r in rows]


def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def format_table(summary: dict) -> str:
    """The trial table as fixed-width text (best trial marked *)."""
    head = ["trial", "status", *summary["params"], "ns_top1", "top1", "bits W/A", "conv", "epochs", "time s"]
    lines = []
    for r in summary["trials"]:
        bits = f"{_fmt(r['avg_bits_w'])}/{_fmt(r['avg_bits_a'])}"
        status = r["status"] + (" (early)" if r["stopped_early"] else "")
        params = [_fmt(r["params"][k], ".4g") for k in summary["params"]]
        lines.append([("*" if r["best"] else " ") + r["trial_id"], status, *params, _fmt(r["ns_top1"]),
                      _fmt(r["top1"]), bits, _fmt(r["converged"]), str(r["epochs"]), _fmt(r["time_s"], ".0f")])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
    c = summary["counts"]
    out.append(f"{len(lines)} trials: {c['completed']} completed, {c['stopped']} stopped early, {c['error']} failed; "
               f"metric {summary['metric']} ({summary['mode']}), * = best")
    return "\n".join(out)


def draw_summary(summary: dict) -> bytes | None:
    """PNG: the metric against each swept setting, and validation top-1 against average weight bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trials = [r for r in summary["trials"] if r["score"] is not None]
    if not trials:
        return None
    params = summary["params"][:6]
    n = len(params) + 1
    fig = Figure(figsize=(3.4 * n, 3.2))
    FigureCanvasAgg(fig)
    style = {"completed": dict(marker="o", color="C0"), "stopped": dict(marker="x", color="C1"),
             "error": dict(marker="s", color="C3")}
    for i, key in enumerate(params):
        ax = fig.add_subplot(1, n, i + 1)
        values = [r["params"][key] for r in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats)
        for x, r in zip(xs, trials):
            ax.scatter([x], [r["score"]], s=90 if r["best"] else 30, **style[r["status"]])
        ax.set_xlabel(key)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_ylabel(summary["metric"])
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, n, n)
    for r in trials:
        if r["avg_bits_w"] is None or r["top1"] is None:
            continue
        marker, color = style[r["status"]]["marker"], style[r["status"]]["color"]
        if marker == "x":  # an x has no face to leave hollow
            kw = {"c": color}
        else:
            kw = {"facecolors": color if r["converged"] else "none", "edgecolors": color}
        ax.scatter([r["avg_bits_w"]], [r["top1"]], s=90 if r["best"] else 30, marker=marker, **kw)
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("val top-1 % (hollow: not converged)")
    ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {summary['name']}: o completed, x stopped early")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _save_summary(summary: dict, experiment: str, parent) -> None:
    """sweep_summary.{json,csv,png} next to the experiment and as artifacts of the sweep's run."""
    cols, rows = _csv_rows(summary)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    files = {f"{SUMMARY_STEM}.json": json.dumps(summary, indent=1, default=str).encode(),
             f"{SUMMARY_STEM}.csv": text.getvalue().encode()}
    try:
        png = draw_summary(summary)
    except Exception as e:  # noqa: BLE001 - a plot must never fail the sweep
        log.warning("sweep plot failed: %s", e)
        png = None
    if png:
        files[f"{SUMMARY_STEM}.png"] = png
    summary["files"] = {}
    for name, data in files.items():
        write_bytes(f"{experiment}/{name}", data)
        summary["files"][name.rsplit(".", 1)[-1]] = f"{experiment}/{name}"
    if parent is None:
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gdnsq-sweep-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
            parent.log_artifact(Path(d) / name)  # staged (copied) at once
    best = best_trial(summary)
    c = summary["counts"]
    parent.log_metrics({"sweep/trials": len(summary["trials"]), "sweep/completed": c["completed"],
                        "sweep/stopped_early": c["stopped"], "sweep/errors": c["error"],
                        **({f"sweep/best/{summary['metric']}": best["score"]} if best else {})})
    parent.set_tags({"gdnsq.best_trial": summary["best_trial"] or "none",
                     **({"gdnsq.registered_model": summary["registered_model"]}
                        if summary.get("registered_model") else {})})
