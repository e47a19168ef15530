import math
from typing import Literal, Optional

import pytest

from cnnlab.core.errors import CnnlabError
from cnnlab.core.validation import PositiveInt, Probability, check_value


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3, int, 3), (3, float, 3.0), (0.5, Probability, 0.5), (True, bool, True), ("a", str, "a"),
        ([1, 2], list[PositiveInt], [1, 2]), ([0.9, 0.99], tuple[float, float], (0.9, 0.99)),
        (None, Optional[PositiveInt], None), (4, Optional[PositiveInt], 4), ("x", Literal["x", "y"], "x"),
    ],
)
def test_valid_values_are_converted(value, annotation, expected):
    out = check_value("k", value, annotation)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        (True, int, "k must be an integer, got True"),  # bool is not an int here
        (1.5, int, "k must be an integer, got 1.5"),
        ("1", float, "k must be a number, got '1'"),
        (math.nan, float, "k must be a finite number"),
        (math.inf, float, "k must be a finite number"),
        (1.0, Probability, "k must be a number >= 0 and < 1, got 1.0"),
        (0, PositiveInt, "k must be an integer >= 1, got 0"),
        (1, bool, "k must be true or false, got 1"),
        ([1, 0], list[PositiveInt], r"k\[1\] must be an integer >= 1, got 0"),
        ([1, 2, 3], tuple[float, float], "k must have 2 items"),
        ("z", Literal["x", "y"], "k must be one of x, y, got 'z'"),
        (0, Optional[PositiveInt], "k must be an integer >= 1 or null, got 0"),
    ],
)
def test_invalid_values_name_the_key(value, annotation, message):
    with pytest.raises(CnnlabError, match=message):
        check_value("k", value, annotation)
