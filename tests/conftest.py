"""Fixtures shared by several test modules."""
import contextlib

import pytest

from tests.s3 import s3_bucket, s3_server  # noqa: F401  (the local S3 server: tests/s3.py)
from tests.small_run import SmallRun, run_small_experiment


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> SmallRun:
    """The small experiment (tests/small_run.py) run once through `gmm-cil run --announce` on a terminal beside
    `gmm-cil serve`, for every module that checks it. Any Ray this process holds is shut down first: the run and the
    service each start their own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return run_small_experiment(tmp_path_factory.mktemp("small-run"))


@pytest.fixture(scope="module")
def ray_shut_down_after():
    """For modules whose runs start their own local Ray (run_experiment does): shut it down after the module,
    so the next module starts from no Ray at all."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one torch thread is faster than fighting over a busy machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _a_local_ray_of_its_own():
    import ray

    from cil_platform.experiment import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(None)
    yield
    ray.shutdown()


@pytest.fixture
def own_ray():
    """A local Ray started for this test alone (its processes are this test's descendants: kill tests find them)."""
    with _a_local_ray_of_its_own():
        yield


@pytest.fixture(scope="module")
def own_ray_for_module():
    """As own_ray, shared by the tests of one module."""
    with _a_local_ray_of_its_own():
        yield
