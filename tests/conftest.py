"""Fixtures shared by several test modules."""
import pytest

from tests.s3 import s3_bucket, s3_server  # noqa: F401  (the local S3 server: tests/s3.py)


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
