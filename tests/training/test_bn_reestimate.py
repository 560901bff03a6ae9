"""BatchNorm re-estimation before validation: plain averages over batches, through the eval-mode forward."""

import pytest
import torch
from torch import nn

from gdnsq.training.evaluation import reestimate_batchnorm


def _net():
    torch.manual_seed(0)
    # Dropout differs between train and eval: the statistics must be those of the eval-mode network.
    return nn.Sequential(
        nn.Dropout(0.5),
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5, momentum=0.3),
    )


def test_statistics_are_plain_averages_of_the_eval_forward():
    net = _net()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 10, 10, generator=gen) * 2 + 1 for _ in range(5)]
    net.train()
    reestimate_batchnorm(net, batches)
    with torch.no_grad():
        pre1 = [net[1](x) for x in batches]  # dropout is the identity in eval mode
        means1 = torch.stack([h.mean((0, 2, 3)) for h in pre1])
        vars1 = torch.stack([h.var((0, 2, 3), unbiased=True) for h in pre1])
    torch.testing.assert_close(net[2].running_mean, means1.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[2].running_var, vars1.mean(0), rtol=1e-5, atol=1e-5)
    assert net.training and net[0].training  # modes and momenta come back as they were
    assert net[2].momentum == 0.1 and net[5].momentum == 0.3
    assert int(net[2].num_batches_tracked) == 5


def test_old_running_statistics_are_forgotten():
    a, b = _net(), _net()
    with torch.no_grad():
        for _ in range(3):  # a's running averages have seen other data
            a(torch.randn(8, 3, 10, 10) * 10)
    batches = [torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    reestimate_batchnorm(a, batches)
    reestimate_batchnorm(b, batches)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(_net(), [])
