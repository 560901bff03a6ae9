"""Workarounds for Ray Tune / Train internals in a sweep (ray#54305 and ASHA's last rung).

This module imports Ray at its top: only :mod:`gdnsq.launch.sweep.tune` imports it, inside functions, so
validating a sweep file needs no Ray. Its classes live at module level under their own names, so pickle
(Tune's ``tuner.pkl`` on restore, the Train controller) finds them by module path.

* :class:`RunToEndASHA` — ASHA that lets a trial at its last epoch finish its run;
* :class:`PlacementGroupRecorder` (Train controller side) and :class:`PlacementGroupReaper` (Tune driver
  side) — remove the worker placement group that a trial stopped by the scheduler leaves behind.
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .plan import run_name

log = logging.getLogger("gdnsq")

KV_NAMESPACE = "gdnsq-sweep"


def _pg_key(name: str) -> bytes:
    return f"pg/{name}".encode()


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
            _internal_kv_put(_pg_key(self.name), pg.id.hex(), overwrite=True, namespace=KV_NAMESPACE)
        except Exception as e:  # noqa: BLE001 - internal API: degrade to Ray's own cleanup
            from ..console import keep_our_warnings

            keep_our_warnings()  # in Train's controller, whose root logger is the job's (ERROR)
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
                pg_hex = _internal_kv_get(_pg_key(run_name(self.sweep_name, trial_id)), namespace=KV_NAMESPACE)
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
