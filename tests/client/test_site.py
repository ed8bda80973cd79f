"""A site's round (client.site): what its update travels as."""

from __future__ import annotations

import numpy as np
import pytest


def test_a_float16_overflow_travels_as_float32_and_a_nan_never_leaves(caplog):
    from client.site import in_transport_dtype
    from mstkd.errors import NonFiniteUpdate

    arrays = {"student.a": np.array([1.0, 70000.0], np.float32), "student.b": np.ones(3, np.float32)}
    wired = in_transport_dtype(arrays, "float16", "h1")
    assert {v.dtype for v in wired.values()} == {np.dtype(np.float32)} and wired["student.a"][1] == 70000.0
    assert "beyond float16's range" in caplog.text
    assert {v.dtype for v in in_transport_dtype({"a": np.ones(2, np.float32)}, "float16", "h1").values()} == {
        np.dtype(np.float16)
    }
    with pytest.raises(NonFiniteUpdate):
        in_transport_dtype({"a": np.array([np.nan], np.float32)}, "float16", "h1")
