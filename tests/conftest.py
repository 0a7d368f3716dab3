"""Shared fixtures and tolerances for the test suite.

Tolerances come from the one table in :mod:`jaxcnn.check` (reasons in the README).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import settings

from jaxcnn.check import TOLERANCES

# Deterministic, bounded property tests: the same examples on every run and every machine.
settings.register_profile("jaxcnn", derandomize=True, deadline=None, max_examples=12,
                          print_blob=True)
settings.load_profile("jaxcnn")


@pytest.fixture
def x64():
    """Run one test with float64 enabled, and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def tol(dtype) -> dict:
    """``rtol`` / ``atol`` for comparing two computations of the same quantity in ``dtype``."""
    return TOLERANCES[np.dtype(dtype).name]


def assert_close(actual, expected, dtype, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol(dtype))
