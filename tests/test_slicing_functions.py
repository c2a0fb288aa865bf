"""slicing_function, SFApplier and PandasSFApplier: Snorkel 0.10's semantics, checked by
hand and, where the bench extra installs it, against Snorkel's own appliers."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from jaxmtl.slicing import PandasSFApplier, SFApplier, SlicingFunction, slicing_function
from jaxmtl.slicing.labels import slice_matrix

DF = pd.DataFrame({"a": [90, 12, 50, -3], "text": ["a b", "a b c d e f", "x", ""]})


@slicing_function()
def big(x):
    return x.a > 42


@slicing_function(name="short")
def few_words(x):
    return len(x.text.split()) < 3


@slicing_function(resources={"limit": 10})
def above(x, limit):
    return x.a > limit


@slicing_function(pre=[lambda x: SimpleNamespace(a=abs(x.a), text=x.text)])
def magnitude_small(x):
    return x.a < 5


@slicing_function()
def abstains_when_negative(x):
    return -1 if x.a < 0 else x.a > 42


def test_pandas_applier_gives_one_int_field_per_function_in_order():
    S = PandasSFApplier([big, few_words, above, magnitude_small]).apply(DF)
    assert isinstance(S, np.recarray)
    assert S.dtype.names == ("big", "short", "above", "magnitude_small")
    assert all(S.dtype[name] == np.int64 for name in S.dtype.names)
    assert S.big.tolist() == [1, 0, 1, 0]
    assert S.short.tolist() == [1, 0, 1, 1]
    assert S.above.tolist() == [1, 1, 1, 0]  # resources reach the function
    assert S.magnitude_small.tolist() == [0, 0, 0, 1]  # |-3| < 5 after the preprocessor
    # What make_slice_dataloader / add_slice_labels read from it.
    S2 = PandasSFApplier([big, few_words]).apply(DF)
    matrix, names = slice_matrix(S2, ["short", "big"])
    assert names == ["big", "short", "base"]
    np.testing.assert_array_equal(matrix, [[1, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]])


def test_list_applier_and_abstains():
    points = [SimpleNamespace(a=a, text=t) for a, t in zip(DF.a, DF.text, strict=True)]
    S = SFApplier([big, abstains_when_negative]).apply(points)
    assert S.big.tolist() == [1, 0, 1, 0]
    assert S.abstains_when_negative.tolist() == [1, 0, 1, -1]
    assert SFApplier([big]).apply([]).shape == (0,)


def test_errors_and_repr():
    with pytest.raises(ValueError, match=r"missing parentheses: write @slicing_function\(\)"):
        @slicing_function
        def f(x):
            return True
    with pytest.raises(ValueError, match=r"PandasSFApplier: slicing function names repeat "
                                         r"\['big'\]"):
        PandasSFApplier([big, SlicingFunction("big", lambda x: True)])
    with pytest.raises(ValueError, match="SlicingFunction 'g': a preprocessor returned None"):
        SlicingFunction("g", lambda x: True, pre=[lambda x: None])(1)
    assert repr(big) == "SlicingFunction big, Preprocessors: []"
    assert repr(SFApplier([big, few_words])) == "SFApplier, SFs: ['big', 'short']"


def test_same_output_as_snorkels_appliers():
    snorkel_slicing = pytest.importorskip("snorkel.slicing")

    def snorkel_sf(name, f, **kwargs):
        return snorkel_slicing.slicing_function(name=name, **kwargs)(f)

    theirs = [snorkel_sf("big", lambda x: x.a > 42),
              snorkel_sf("above", lambda x, limit: x.a > limit, resources={"limit": 10}),
              snorkel_sf("neg", lambda x: -1 if x.a < 0 else x.a > 42)]
    ours = [slicing_function(name="big")(lambda x: x.a > 42),
            slicing_function(name="above", resources={"limit": 10})(
                lambda x, limit: x.a > limit),
            slicing_function(name="neg")(lambda x: -1 if x.a < 0 else x.a > 42)]
    expected = snorkel_slicing.PandasSFApplier(theirs).apply(DF, progress_bar=False)
    got = PandasSFApplier(ours).apply(DF)
    assert got.dtype == expected.dtype
    for name in expected.dtype.names:
        np.testing.assert_array_equal(got[name], expected[name])
