"""The method registry: a name taken twice is replaced with a warning, never silently."""

import warnings

import pytest

from gdnsq.quant import methods


def test_registering_a_taken_name_warns_and_replaces(monkeypatch):
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))

    def first(shape, spec):
        return "first"

    def second(shape, spec):
        return "second"

    methods.register_method("mine")(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        methods.register_method("mine")(first)  # the same factory again (a re-import): no warning
    with pytest.warns(RuntimeWarning, match=r"'mine' was registered by .*first; .*second replaces it"):
        methods.register_method("mine")(second)
    assert methods._METHODS["mine"] is second
