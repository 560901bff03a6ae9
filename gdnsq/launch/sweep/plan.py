"""The sweep plan: a sweep file read and validated without Ray, and what a trial's job is.

A sweep file is a job file (the base job) plus a ``sweep:`` section (its schema, :class:`SweepConfig`,
is in :mod:`gdnsq.config`)::

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

:func:`load_sweep` validates everything before Ray starts (one-line :class:`SweepError`), down to the
quantized structure of the base job and of each listed value of a swept ``model.*`` / ``quant.*`` setting;
:func:`trial_config` is a trial's job (base + sampled params, named :func:`run_name`, no timestamps, so a
restored sweep finds its trials). Only :func:`param_space` touches Ray (``ray.tune``'s distributions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ...config import (
    JobConfig,
    SweepConfig,
    apply_overrides,
    did_you_mean,
    from_dict,
    known_keys,
    parse_yaml,
    read_yaml,
    set_dotted,
    setting_type,
)
from ...errors import ConfigError, SweepError
from ..preflight import check_structure

log = logging.getLogger("gdnsq")

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Settings a trial may not change: its name and storage are the sweep's, resources are planned once.
FIXED_SECTIONS = ("name", "ray", "tracking")
# Settings that change the quantized structure: each swept value is built once (meta device) up front.
STRUCTURE_SECTIONS = ("model", "quant")


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


def _check_value(base: dict, key: str, value: Any) -> None:
    try:
        job = from_dict(JobConfig, apply_overrides(base, {key: value}))
        if key.split(".")[0] in STRUCTURE_SECTIONS:
            check_structure(job)
    except ConfigError as e:
        raise SweepError(f"sweep.space.{key}: value {value!r} makes an invalid job ({e})") from None


def validate_space(space: Any, base: dict, search: str) -> None:
    """Every key a known, sweepable setting; every spec well formed; every value a valid job."""
    if not isinstance(space, dict) or not space:
        raise SweepError(
            "sweep.space: empty; name at least one dotted setting, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}"
        )
    valid = known_keys()
    for key, spec in space.items():
        name = f"sweep.space.{key}"
        if key not in valid:
            raise SweepError(
                f"{name}: unknown setting{did_you_mean(key, valid)} (expected a dotted job setting such as optim.lr)"
            )
        if key.split(".")[0] in FIXED_SECTIONS:
            raise SweepError(f"{name}: cannot be swept (a trial's name, resources and tracking are the sweep's)")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise SweepError(
                f"{name}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}}; got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        if search == "grid" and kind != "grid":
            raise SweepError(
                f"{name}: search: grid takes only {{grid: [...]}}; use search: random or optuna for {kind}"
            )
        if search == "optuna" and kind == "grid":
            raise SweepError(f"{name}: search: optuna cannot enumerate a grid; use {{choice: [...]}}")
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise SweepError(f"{name}: {kind} needs a non-empty list of values, got {args!r}")
            for value in args:
                _check_value(base, key, value)
            continue
        tp = setting_type(key)
        if not (
            isinstance(args, list)
            and len(args) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
        ):
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
                raise SweepError(
                    f"{name}: {kind} needs a real-valued setting, {key} is {getattr(tp, '__name__', tp)}{hint}"
                )
            if kind == "loguniform" and lo <= 0:
                raise SweepError(f"{name}: loguniform needs lo > 0, got {lo}")
            checks = (lo, hi)
        for value in checks:
            _check_value(base, key, value)


# What ray_train adds to every epoch's report (next to run_job's EPOCH_METRICS); dist/checksum/r<rank> too.
RAY_METRICS = ("run/resumed_from_epoch", "sys/wall_s", "sys/cpu_s", "dist/replicas_equal", "dist/num_nodes")


def check_metric(metric: str) -> None:
    """The sweep metric must be a key the trials report, else every trial would score nothing."""
    import difflib
    import re

    from ...training.job import EPOCH_METRICS

    known = EPOCH_METRICS + RAY_METRICS
    if metric in known or re.fullmatch(r"dist/checksum/r\d+", metric):
        return
    close = difflib.get_close_matches(metric, known, n=1)
    hint = f"did you mean {close[0]}?" if close else "e.g. val/ns_top1, val/top1, bits/avg_w"
    raise SweepError(f"sweep.metric: trials do not report {metric!r}; {hint}")


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict]:
    job = {k: v for k, v in overrides.items() if not k.startswith("sweep.")}
    sweep = {k[len("sweep.") :]: v for k, v in overrides.items() if k.startswith("sweep.")}
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
        if isinstance(value, str):
            try:
                value = parse_yaml(value)
            except yaml.YAMLError as e:
                raise SweepError(f"sweep.{key}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if key.startswith("space."):  # space keys are dotted settings themselves: --sweep.space.optim.lr '{...}'
            sweep_data.setdefault("space", {})[key[len("space.") :]] = value
            continue
        set_dotted(sweep_data, key, value)
    try:
        base = apply_overrides(data, job_over)
        job = from_dict(JobConfig, base)
        check_structure(job)
    except ConfigError as e:
        raise SweepError(f"{e} (in the base job)") from None
    if not job.ray.enabled:
        raise SweepError("ray.enabled: a sweep runs every trial on Ray Train; set it true")
    try:
        sweep = from_dict(SweepConfig, sweep_data, "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    check_metric(sweep.metric)
    validate_space(sweep.space, base, sweep.search)
    if sweep.scheduler.type == "asha" and "train.epochs" in sweep.space:
        raise SweepError("sweep.space.train.epochs: cannot be swept with ASHA (its budget is the base job's epochs)")
    if sweep.scheduler.type == "asha" and sweep.scheduler.max_t and sweep.scheduler.max_t > job.train.epochs:
        raise SweepError(f"sweep.scheduler.max_t: {sweep.scheduler.max_t} exceeds train.epochs ({job.train.epochs})")
    return SweepPlan(base=base, job=job, sweep=sweep)


def param_space(sweep: SweepConfig) -> dict:
    """The Tune search space (flat dotted keys)."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
    }
    return {key: make[kind](args) for key, spec in sweep.space.items() for kind, args in spec.items()}


# -------------------------------------------------------------------------------------- trials


def run_name(sweep_name: str, trial_id: str) -> str:
    """A trial's Ray Train run and MLflow run name: stable across driver restarts."""
    return f"{sweep_name}-{trial_id}"


def trial_config(base: dict, params: dict, sweep_name: str, trial_id: str, trials_dir: str) -> JobConfig:
    """Base job + sampled params; the run is named after the trial and registers nothing itself."""
    fixed = {"name": run_name(sweep_name, trial_id), "ray.storage_path": trials_dir, "tracking.register": False}
    return from_dict(JobConfig, apply_overrides(base, {**params, **fixed}))


# ----------------------------------------------------------------------------------- resources


def plan_concurrency(plan: SweepPlan, use_gpu: bool, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``, lowered so every running trial's workers (+ driver) fit at once.

    Train V2 places each trial's worker group outside Tune's accounting, so Tune alone would start
    more trials than the cluster can place; their worker groups would then time out (ray#54305).
    """
    r = plan.job.ray
    need = {"CPU": r.num_workers * (r.cpus_per_worker or 1) + plan.sweep.trial_resources.get("CPU", 0.0)}
    if use_gpu:
        need["GPU"] = r.num_workers + plan.sweep.trial_resources.get("GPU", 0.0)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    if fits < 1:
        raise SweepError(
            f"ray.num_workers: one trial needs {need} but the cluster has "
            f"{ {k: cluster.get(k, 0.0) for k in need} }; lower ray.num_workers or ray.cpus_per_worker"
        )
    n = min(plan.sweep.max_concurrent_trials, fits)
    if n < plan.sweep.max_concurrent_trials:
        log.warning(
            "sweep.max_concurrent_trials lowered from %d to %d: the cluster places %d trial(s) of %s at once",
            plan.sweep.max_concurrent_trials,
            n,
            fits,
            need,
        )
    return n
