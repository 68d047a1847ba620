"""Fixtures shared by several test modules."""
from tests.s3 import s3_bucket, s3_server  # noqa: F401  (the local S3 server: tests/s3.py)
