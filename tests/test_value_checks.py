"""The shared checks of numeric settings: one line naming the key, bools and non-finite values refused."""

from __future__ import annotations

import math

import pytest

from kd_lightning.engine.errors import ConfigError, check_fraction, check_positive
from kd_lightning.llm.divergences import ForwardKL


@pytest.mark.parametrize("value", [0, -1.5, math.nan, math.inf, True, "2"])
def test_check_positive_refuses_in_one_line_naming_the_key(value) -> None:
    with pytest.raises(ConfigError, match=r"^some\.key=") as error:
        check_positive(value, "some.key", " (a note)")
    assert "\n" not in str(error.value)


def test_check_positive_passes_numbers_and_optional_none() -> None:
    assert check_positive(2, "k") == 2.0 and isinstance(check_positive(2, "k"), float)
    assert check_positive(None, "k", allow_none=True) is None
    with pytest.raises(ConfigError, match=r"^k=None must be int or float"):
        check_positive(None, "k")


@pytest.mark.parametrize("value", [-0.1, 1.01, math.nan, False])
def test_check_fraction_refuses_outside_the_unit_interval(value) -> None:
    with pytest.raises(ConfigError, match=r"^some\.alpha="):
        check_fraction(value, "some.alpha", "; 1 is distillation only")


def test_a_boolean_temperature_is_no_longer_read_as_one() -> None:
    with pytest.raises(ConfigError, match=r"llm\.loss\.divergence\.temperature=True must be int or float"):
        ForwardKL(temperature=True)
