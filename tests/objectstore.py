"""A real S3 store for the objstore tests: one throwaway Ceph 16 RGW
(tools/ceph-rgw) per test session, in a temporary directory.

conftest.py makes its fixtures everyone's; `rgw` starts the cluster once,
waits until a PUT works (a condition, not a sleep: RGW answers HTTP before
its pools exist) and stops every daemon at the end of the session; while it
runs, AWS_ENDPOINT_URL and the keys are in the environment of the tests and
of the processes they start.
"""

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time

import pytest

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "ceph-rgw")
READY_S = 120   # first start measured at ~6-7 s here; a loaded machine takes longer
_names = itertools.count(1)


class Rgw:
    """The running cluster: its directory, its environment, stop/start of radosgw."""

    def __init__(self, directory: str):
        self.directory = directory
        self.env: dict[str, str] = {}

    def start(self) -> None:
        out = subprocess.run([TOOL, "start", self.directory], check=True, capture_output=True, text=True,
                             timeout=READY_S).stdout
        self.env = dict(line.split("=", 1) for line in out.split() if "=" in line)

    def admin(self, *args: str) -> str:
        """radosgw-admin on this cluster."""
        return subprocess.run(["radosgw-admin", *args], check=True, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CEPH_CONF": os.path.join(self.directory, "ceph.conf")}).stdout

    def stop_rgw(self) -> None:
        subprocess.run([TOOL, "stop", self.directory, "rgw"], check=True, timeout=60)

    def stop(self) -> None:
        subprocess.run([TOOL, "stop", self.directory], check=True, timeout=120)

    def wait_for_put(self) -> None:
        """Until a PUT is stored (radosgw creates its pools on first use)."""
        from rpofs.errors import StoreError
        from rpofs.store.s3 import Bucket, StoreUrl
        deadline = time.monotonic() + READY_S
        with Bucket(StoreUrl.parse("s3://rpofs-probe"), attempts=1, connect_timeout=2, read_timeout=10) as bucket:
            while True:
                try:
                    bucket.ensure_bucket()
                    bucket.delete("probe")
                    bucket.put_new("probe", b"ready")
                    return
                except StoreError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # the condition is polled; this is its interval


@pytest.fixture(scope="session")
def rgw():
    directory = tempfile.mkdtemp(prefix="rpofs-rgw-", dir="/var/tmp")
    cluster = Rgw(directory)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")}
    try:
        cluster.start()
        os.environ.update(cluster.env)
        for k in ("AWS_PROFILE",):
            os.environ.pop(k, None)
        # no ~/.aws of the machine's user: the tests see only what they set
        os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(directory, "none")
        cluster.wait_for_put()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def store_url(rgw) -> str:
    """A store of its own for each test: a new bucket and prefix."""
    return f"s3://rpofs-t{os.getpid()}-{next(_names)}/repo"
