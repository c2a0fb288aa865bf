"""Slicing functions and their appliers, with Snorkel 0.10's names and semantics.

A slicing function says whether one data point is in a slice; an applier runs several
over a data set and returns ``S``, a record array with one int field per function (1 in
the slice, 0 not, -1 abstained), which ``make_slice_dataloader``, ``add_slice_labels``
and ``Scorer.score_slices`` read::

    @slicing_function()
    def short(x):
        return len(x.text.split()) < 5

    S = PandasSFApplier([short]).apply(df)      # S.short: [N] int

Plain Python, no torch: a Snorkel user's slicing functions run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PandasSFApplier", "SFApplier", "SlicingFunction", "slicing_function"]


class SlicingFunction:
    """A named function of one data point: ``f(x, **resources)`` after ``pre``.

    Args:
      name: the slice's name (the field of the applier's output).
      f: the function; returns True/False (or 1/0; a negative value abstains).
      resources: keyword arguments passed to ``f`` on every call.
      pre: callables applied to the data point, in order, before ``f`` (Snorkel's
        preprocessors); one returning None is an error.
    """

    def __init__(self, name: str, f: Callable[..., Any],
                 resources: Mapping[str, Any] | None = None,
                 pre: Sequence[Callable[[Any], Any]] | None = None) -> None:
        self.name = name
        self._f = f
        self._resources = dict(resources or {})
        self._pre = list(pre or [])

    def __call__(self, x: Any) -> Any:
        for preprocessor in self._pre:
            x = preprocessor(x)
            if x is None:
                raise ValueError(f"SlicingFunction '{self.name}': a preprocessor returned None")
        return self._f(x, **self._resources)

    def __repr__(self) -> str:
        return f"SlicingFunction {self.name}, Preprocessors: {self._pre}"


class slicing_function:  # noqa: N801 - Snorkel's name, used as a decorator
    """Decorator making a ``SlicingFunction`` of a function (named after it by default).

    Args:
      name: the slice's name; defaults to the function's ``__name__``.
      resources: keyword arguments passed to the function on every call.
      pre: preprocessors run on the data point first.

    Raises:
      ValueError: used without parentheses (``@slicing_function``).
    """

    def __init__(self, name: str | None = None, resources: Mapping[str, Any] | None = None,
                 pre: Sequence[Callable[[Any], Any]] | None = None) -> None:
        if callable(name):
            raise ValueError("Looks like this decorator is missing parentheses: write "
                             "@slicing_function()")
        self.name, self.resources, self.pre = name, resources, pre

    def __call__(self, f: Callable[..., Any]) -> SlicingFunction:
        return SlicingFunction(self.name or f.__name__, f, self.resources, self.pre)


class SFApplier:
    """Applies slicing functions to a sequence of data points (Snorkel's ``SFApplier``).

    Args:
      sfs: the slicing functions (unique names).

    Raises:
      ValueError: two functions share a name.
    """

    def __init__(self, sfs: Sequence[SlicingFunction]) -> None:
        names = [sf.name for sf in sfs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"{type(self).__name__}: slicing function names repeat {repeated}")
        self._sfs = list(sfs)
        self._names = names

    def apply(self, data_points: Iterable[Any], progress_bar: bool = False) -> np.recarray:
        """``S``: [N] records, one int64 field per slicing function: 1 in the slice, 0 not,
        -1 where the function abstained (returned a negative value).

        Args:
          data_points: the data points (any objects the functions read).
          progress_bar: accepted for Snorkel's signature; no bar is shown.
        """
        return self._records(self._values(x) for x in data_points)

    def _values(self, x: Any) -> list[int]:
        values = []
        for sf in self._sfs:
            value = int(sf(x))
            values.append(value if value >= 0 else -1)
        return values

    def _records(self, rows: Iterable[list[int]]) -> np.recarray:
        table = np.array(list(rows), np.int64).reshape(-1, len(self._sfs))
        S = np.recarray(len(table), dtype=[(name, np.int64) for name in self._names])
        for index, name in enumerate(self._names):
            S[name] = table[:, index]
        return S

    def __repr__(self) -> str:
        return f"{type(self).__name__}, SFs: {self._names}"


class PandasSFApplier(SFApplier):
    """Applies slicing functions to each row of a pandas DataFrame (a ``Series`` per
    call, so ``x.column`` reads a field), as Snorkel's ``PandasSFApplier``."""

    def apply(self, df: Any, progress_bar: bool = False) -> np.recarray:
        """``S`` for the rows of ``df``, in order (see ``SFApplier.apply``)."""
        return self._records(self._values(row) for _, row in df.iterrows())
