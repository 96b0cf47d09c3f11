"""pytest configuration: markers, and the multi-rank worker pools shut down at session end."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


@pytest.fixture(scope="session", autouse=True)
def _shutdown_worker_pools():
    yield
    from distributed import shutdown_pools

    shutdown_pools()
