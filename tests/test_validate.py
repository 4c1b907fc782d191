"""The library's one validation module: one ``ValueError`` line naming the argument, what is
allowed and what was given."""

import math

import numpy as np
import pytest

from chimera import _validate as v


@pytest.mark.parametrize(("call", "message"), [
    (lambda: v.number("rho", 1.5, 0, 1), "rho must be a number in [0, 1], got 1.5"),
    (lambda: v.number("lr", math.nan, 0), "lr must be a number >= 0, got nan"),
    (lambda: v.number("lr", True, 0), "lr must be a number >= 0, got True"),
    (lambda: v.number("eps", 0.0, 0, low_open=True), "eps must be a number > 0, got 0.0"),
    (lambda: v.integer("K", 0, 1), "K must be an integer >= 1, got 0"),
    (lambda: v.integer("K", 2.0, 1), "K must be an integer >= 1, got 2.0"),
    (lambda: v.choice("mode", "x", ("a", "b")), "mode must be one of"),
    (lambda: v.number("lr", math.inf, 0), "lr must be a finite number >= 0, got inf"),
    (lambda: v.number("shift", -math.inf), "shift must be a finite number, got -inf"),
    (lambda: v.number("shift", math.nan), "shift must be a number, got nan"),
    (lambda: v.number("lr", 10**400, 0), "lr must be a finite number >= 0, got 1000"),
    (lambda: v.optional_number("clip", math.inf, 0, low_open=True),
     "clip must be None or a finite number > 0, got inf"),
    (lambda: v.number_tuple("betas", (0.9,), 2, 0, 1, high_open=True),
     "betas must be a tuple of 2 numbers in [0, 1), got (0.9,)"),
    (lambda: v.number_tuple("betas", 0.9, 2), "betas must be a tuple of 2 numbers, got 0.9"),
    (lambda: v.number_tuple("betas", "ab", 2), "betas must be a tuple of 2 numbers, got 'ab'"),
    (lambda: v.number_tuple("betas", (0.9, math.inf), 2, 0, 1, high_open=True),
     "betas[1] must be a number in [0, 1), got inf"),
    (lambda: v.number_tuple("betas", (math.nan, 0.9), 2), "betas[0] must be a number, got nan"),
])
def test_rejections_are_one_line_naming_the_argument(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_accepted_values_come_back_typed():
    assert v.number("lr", np.float32(0.5), 0) == 0.5 and isinstance(v.number("lr", 1, 0), float)
    assert v.integer("K", np.int64(3), 1) == 3
    assert v.optional_number("clip", None) is None
    assert v.choice("mode", "a", ("a", "b")) == "a"
    assert v.number("lr", 1e300, 0) == 1e300  # finite, however large
    assert v.number("bound", math.inf, 0, allow_inf=True) == math.inf
    assert v.optional_number("clip", -math.inf, allow_inf=True) == -math.inf
    assert v.number_tuple("betas", [0.5, np.float32(0.25)], 2, 0, 1) == (0.5, 0.25)


def test_allow_inf_still_rejects_nan_and_out_of_range_infinities():
    with pytest.raises(ValueError, match=r"^x must be a number >= 0, got nan$"):
        v.number("x", math.nan, 0, allow_inf=True)
    with pytest.raises(ValueError, match=r"^x must be a number >= 0, got -inf$"):
        v.number("x", -math.inf, 0, allow_inf=True)
    with pytest.raises(ValueError, match=r"^x must be a number in \[0, 1\], got inf$"):
        v.number("x", math.inf, 0, 1, allow_inf=True)


def test_known_keys_names_the_owner_the_unknown_keys_and_the_allowed_ones():
    v.known_keys("optimizer 'sgd'", ["lr"], ["lr", "momentum"], "hyper-parameter")
    with pytest.raises(ValueError, match=r"^optimizer 'sgd' has no hyper-parameter 'betas', "
                                         r"'eps'; allowed: lr, momentum$"):
        v.known_keys("optimizer 'sgd'", ["eps", "betas", "lr"], ["lr", "momentum"],
                     "hyper-parameter")
    with pytest.raises(ValueError, match=r"^no key 'x'; allowed: hidden: int$"):
        v.known_keys("", {"x": 1}, {"hidden": "int"})


def test_int_tuple_takes_any_iterable_of_integers_in_range_and_names_what_it_refuses():
    assert v.int_tuple("shape", [2, np.int64(3)], 1) == (2, 3)
    assert v.int_tuple("shape", (), 0) == () and v.int_tuple("shape", range(2), 0) == (0, 1)
    for bad, message in [
        ((2, 0), "shape must be a tuple of integers >= 1, got (2, 0)"),
        ((2, True), "shape must be a tuple of integers >= 1, got (2, True)"),
        ((2.0,), "shape must be a tuple of integers >= 1, got (2.0,)"),
        ("12", "shape must be a tuple of integers >= 1, got '12'"),
        (3, "shape must be a tuple of integers >= 1, got 3"),
    ]:
        with pytest.raises(ValueError) as err:
            v.int_tuple("shape", bad, 1)
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^shape must be a non-empty tuple of integers, got "):
        v.int_tuple("shape", (), non_empty=True)
