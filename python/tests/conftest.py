"""pytest setup: make `kvattn` importable from a checkout (python/ on sys.path when it is not
installed) and give the tests their shared fixtures."""

import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # `import reference`
try:
    import kvattn  # noqa: F401  (installed, or PYTHONPATH=python)
except ImportError:
    sys.path.insert(0, os.path.dirname(_HERE))

# The CPU backends every test runs on: the threaded fast path and the float64 reference.
CPU_BACKENDS = ["cpu", "reference"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def rng(request):
    # A fixed seed per test (its node id), fresh inputs per case.
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
