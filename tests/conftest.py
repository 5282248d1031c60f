"""Shared test configuration: hypothesis profiles, the ``gpu`` marker, and the
launch-argument checks of :mod:`cupy_lean.kernels`.

Pick a hypothesis profile with ``HYPOTHESIS_PROFILE=ci|dev|thorough``
(default ``dev``).
"""

import os

# Must be set before cupy_lean.kernels is imported: it reads the variable once.
os.environ["CUPY_LEAN_CHECK_ARGS"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

settings.register_profile("ci", max_examples=25, **_COMMON)
settings.register_profile("dev", max_examples=60, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
