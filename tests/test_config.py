"""Config loading: YAML + overrides into validated dataclasses, errors naming the key."""

from __future__ import annotations

import pytest

from train.config import ConfigError, load_config
from train.experiment import TrainConfig


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1.0e+39", 1e39), ("-2E3", -2000.0), (".5e1", 5.0),
                                         ("3", 3.0)])
def test_exponent_notation_is_a_float_wherever_it_is_written(tmp_path, text, value):
    # YAML 1.1 reads 1e-4 (no dot) as the string "1e-4"; a user writing it means the number.
    assert load_config(TrainConfig, None, [f"optim.lr={text}"]).optim.lr == value
    path = tmp_path / "train.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    assert load_config(TrainConfig, path).optim.lr == value


@pytest.mark.parametrize("text", ["fast", "nan", "1e", "1e-4e2"])
def test_text_that_is_not_a_number_is_still_refused(text):
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float"):
        load_config(TrainConfig, None, [f"optim.lr={text}"])
