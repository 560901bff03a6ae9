"""Where a Ray run's workers go: each worker's CPU share resolved against the alive nodes, GPUs or not, and a
one-line refusal, before any training, when the cluster cannot place them all."""

from __future__ import annotations

import dataclasses
import math

from ..config import JobConfig
from ..errors import ConfigError


def cpus_per_worker(cfg: JobConfig, use_gpu: bool, nodes: list[dict]) -> int:
    """``ray.cpus_per_worker``, or for None a node's CPUs shared by the workers it will hold.

    The workers spread over the alive nodes (GPU nodes with ``use_gpu``), ceil(workers / nodes) per
    node, sized by the smallest node. Train V2's controller actor reserves no CPU (``num_cpus=0`` in
    Ray 2.60) and the driver none either, so on a 2-core machine one worker gets both cores.
    """
    if cfg.ray.cpus_per_worker is not None:
        return cfg.ray.cpus_per_worker
    res = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    res = [r for r in res if r.get("CPU", 0) >= 1 and (not use_gpu or r.get("GPU", 0) >= 1)]
    if not res:
        return 1
    per_node = math.ceil(cfg.ray.num_workers / len(res))
    if use_gpu:  # one GPU per worker: a node holds at most its GPU count
        per_node = max(per_node, math.ceil(cfg.ray.num_workers / sum(int(r["GPU"]) for r in res)))
    return max(1, int(min(r["CPU"] for r in res) // per_node))


def with_cpu_share(cfg: JobConfig, use_gpu: bool) -> JobConfig:
    """The config with ``ray.cpus_per_worker`` resolved against the connected cluster."""
    import ray

    cpus = cpus_per_worker(cfg, use_gpu, ray.nodes())
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, cpus_per_worker=cpus))


def resolve_use_gpu(cfg: JobConfig, cluster: dict[str, float]) -> bool:
    if cfg.ray.use_gpu is not None:
        use_gpu = cfg.ray.use_gpu
    else:
        use_gpu = cluster.get("GPU", 0) > 0 and cfg.train.device != "cpu"
    if use_gpu and cfg.train.device == "cpu":
        raise ConfigError("ray.use_gpu: true contradicts train.device: cpu")
    if not use_gpu and cfg.train.device == "cuda":
        raise ConfigError("train.device: cuda needs GPU workers (ray.use_gpu) and GPUs in the cluster")
    return use_gpu


def check_resources(cfg: JobConfig, use_gpu: bool, nodes: list[dict]) -> None:
    """One-line ConfigError when the alive nodes cannot place every worker (before any training).

    Each worker's bundle (``ray.cpus_per_worker`` CPUs, one GPU with ``use_gpu``) must fit on one
    node, so the count is per node, not over the cluster's total.
    """
    need_cpu, need_gpu = cpus_per_worker(cfg, use_gpu, nodes), 1 if use_gpu else 0
    slots, total_cpu, total_gpu = 0, 0.0, 0.0
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        total_cpu, total_gpu = total_cpu + cpu, total_gpu + gpu
        fits = int(cpu // need_cpu)
        if need_gpu:
            fits = min(fits, int(gpu // need_gpu))
        slots += fits
    if slots < cfg.ray.num_workers:
        want = f"{cfg.ray.num_workers} x ({need_cpu} CPU{f' + {need_gpu} GPU' if need_gpu else ''})"
        have = f"{total_cpu:g} CPUs{f' / {total_gpu:g} GPUs' if need_gpu else ''} on {len(nodes)} node(s)"
        raise ConfigError(
            f"ray.num_workers: {want} cannot be placed on this cluster ({have}, room for "
            f"{slots} worker(s)); lower ray.num_workers or ray.cpus_per_worker"
        )
