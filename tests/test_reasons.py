"""reasons.py: the (stage, error) vocabulary of the bad-sample ledger."""

from __future__ import annotations

import inspect
import re

import pipeline.decode
import pipeline.decodepool
import pipeline.preprocess
import pipeline.reader
from pipeline.reasons import ERRORS, STAGES, Reason


def test_str_and_parse_round_trip():
    reason = Reason("decode", "not_an_image")
    assert str(reason) == "decode/not_an_image"
    assert Reason.parse("decode/not_an_image") == reason
    assert Reason.parse("read/a/b") == Reason("read", "a/b")  # the error is what follows the first "/"
    assert Reason.parse("odd") == Reason("odd", "")  # recorded strings are reported, never refused
    assert sorted([Reason("read", "no_image"), Reason("decode", "x"), Reason("decode", "a")]) == [
        Reason("decode", "a"), Reason("decode", "x"), Reason("read", "no_image")]


def test_every_named_error_is_documented():
    """The error names the stages raise in the code are all listed in ERRORS."""
    assert set(ERRORS) == set(STAGES)
    named = {
        "read": re.findall(r'"([a-z_]+)",\s*f"', inspect.getsource(pipeline.reader)),
        "decode": re.findall(r'DecodeError\("([a-z_]+)"', inspect.getsource(pipeline.decode))
        + re.findall(r'DecodeFailure\("decode", "([a-z_]+)"', inspect.getsource(pipeline.decodepool)),
        "preprocess": re.findall(r'PreprocessError\("([a-z_]+)"', inspect.getsource(pipeline.preprocess)),
    }
    for stage, errors in named.items():
        assert errors, stage
        assert set(errors) <= set(ERRORS[stage]), (stage, set(errors) - set(ERRORS[stage]))
