"""The shared JSON conventions: timestamps, plain values, objects read back."""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import pytest

from pipeline.jsonutil import jsonable, parse_object, utc_now


def test_utc_now_is_iso_to_the_second():
    stamp = utc_now()
    parsed = datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and parsed.microsecond == 0 and "." not in stamp


def test_jsonable_makes_plain_values():
    value = {1: (np.float32(0.5), np.int64(3)), "nested": [{"x": np.bool_(True)}], "nan": math.nan}
    assert json.dumps(jsonable(value), sort_keys=True) == (
        '{"1": [0.5, 3], "nan": NaN, "nested": [{"x": true}]}'
    )
    strict = jsonable({"a": [math.inf, np.float64(-math.inf), 1.5], "b": np.float64(math.nan)}, finite=True)
    assert strict == {"a": [None, None, 1.5], "b": None}


def test_parse_object_names_what_it_read():
    assert parse_object(b'{"a": 1}', "thing", KeyError) == {"a": 1}
    with pytest.raises(ValueError, match=r"^record x is not valid JSON"):
        parse_object("{", "record x", ValueError)
    with pytest.raises(ValueError, match=r"^record x is not a JSON object$"):
        parse_object("[1]", "record x", ValueError)
