"""Fixtures shared by the sweep tests (test_sweep.py, test_front_sweep.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> str:
    """A small FP teacher (40 steps: its accuracy does not matter here), trained once for the session."""
    import torch
    import torch.nn.functional as F

    from gdnsq.config import ModelConfig
    from gdnsq.data.bundled import create_bundled_loaders
    from gdnsq.training.models import create_model

    torch.manual_seed(0)
    train, _, _, nc, ch = create_bundled_loaders(64, seed=0)
    model = create_model(ModelConfig(name="gdnsq_smallcnn"), num_classes=nc, in_chans=ch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(train):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 40:
            break
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return str(path)
