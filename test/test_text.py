"""mpvss_ros.text.shown: a caller's value named in an error, even one Python cannot print."""

import pytest

from mpvss_ros.text import shown


@pytest.mark.parametrize("value", [3, -2.5, "cuda:0", None, [1, "a"], {"k": (1, 2)}, 10**4000])
def test_printable_values_are_their_repr(value):
    assert shown(value) == repr(value)


def test_integers_past_the_digit_limit_are_described_not_raised():
    """repr() of an int of more than 4300 digits raises ValueError (CPython 3.11+)."""
    with pytest.raises(ValueError):
        repr(10**5000)
    assert shown(10**5000) == shown(-(10**5000)) == "an integer too long to print"
    assert shown([1, 10**5000]) == "a list holding an integer too long to print"
    assert shown({"a": (10**5000,)}) == "a dict holding an integer too long to print"


def test_other_errors_of_a_repr_are_not_hidden():
    class Broken:
        def __repr__(self):
            raise RuntimeError("broken repr")

    with pytest.raises(RuntimeError, match="broken repr"):
        shown(Broken())
