"""The bundled digits' split: data.val_fraction sets the validation share, the test split never moves."""

import pytest

from gdnsq.config import DataConfig
from gdnsq.data.bundled import TEST_SIZE, load_bundled
from gdnsq.errors import ConfigError


def test_val_fraction_sets_the_validation_share_and_the_test_split_stays():
    default, wider = load_bundled(0.1), load_bundled(0.2)
    assert (len(default.train), len(default.val), len(default.test)) == (3500, 500, TEST_SIZE)
    assert (len(wider.train), len(wider.val), len(wider.test)) == (3000, 1000, TEST_SIZE)
    assert default.test.tensors[1].equal(wider.test.tensors[1])  # the same 1,000 test digits
    assert default.val.tensors[0].equal(wider.val.tensors[0][500:])  # validation grows into the training set


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.6, 1.5, float("nan")])
def test_val_fraction_out_of_range_is_one_line(bad):
    with pytest.raises(ConfigError, match=r"^data.val_fraction: must be in \(0, 0.5\]"):
        DataConfig(val_fraction=bad)
