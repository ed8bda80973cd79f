"""What counts as a number in data from outside (mstkd.numbers)."""

from __future__ import annotations

import numpy as np

from mstkd.numbers import is_finite, is_number, is_whole


def test_a_bool_is_no_number_and_nan_inf_or_a_huge_int_is_not_finite():
    for value in (True, False, "1", None, [1], 1j):
        assert not is_number(value) and not is_whole(value) and not is_finite(value)
    assert is_number(float("nan")) and not is_finite(float("nan")) and not is_finite(float("-inf"))
    assert is_whole(10**400) and not is_finite(10**400)  # beyond a float's range: math.isfinite cannot take it
    assert is_finite(3) and is_finite(-2.5) and is_whole(3) and not is_whole(3.0)
    # np.float64 is a Python float, np.float32 is not (Flower's records and JSON hold Python numbers)
    assert is_finite(np.float64(1.5)) and not is_finite(np.float64("nan")) and not is_number(np.float32(1.5))
