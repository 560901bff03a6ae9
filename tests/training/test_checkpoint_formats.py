"""model.checkpoint takes the FP weights in the formats people have (issue 27)."""

from __future__ import annotations

import pytest
import torch

from gdnsq.config import ModelConfig
from gdnsq.errors import ConfigError
from gdnsq.training.models import create_model


def _model(checkpoint=None):
    return create_model(ModelConfig(checkpoint=checkpoint), num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    return {k: v.clone() for k, v in _model().state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: s, id="plain (timm / torchvision)"),
        pytest.param(lambda s: {"state_dict": s, "epoch": 3, "optimizer": {}}, id="full checkpoint state_dict"),
        pytest.param(lambda s: {"model": s, "args": {"lr": 0.1}}, id="full checkpoint model"),
        pytest.param(
            lambda s: {
                "state_dict": {f"model.{k}": v for k, v in s.items()} | {"criterion.weight": torch.ones(10)},
                "pytorch-lightning_version": "2.4.0",
                "epoch": 9,
            },
            id="Lightning (model. prefix, other modules)",
        ),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="DDP (module. prefix)"),
        pytest.param(lambda s: {"teacher": s, "engine": {}}, id="gdnsq checkpoint"),
    ],
)
def test_checkpoint_formats_load_the_same_weights(trained, wrap, tmp_path):
    path = tmp_path / "fp.pt"
    torch.save(wrap(trained), path)
    loaded = _model(str(path)).state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(ConfigError, match=r"^model.checkpoint: .* does not fit gdnsq_smallcnn \(missing \d+ tensors"):
        _model(str(path))
