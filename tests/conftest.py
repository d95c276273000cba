import os
import sys

import pytest

# tests import their helpers (vmlab, synth) by name
sys.path.insert(0, os.path.dirname(__file__))

from objectstore import rgw, store_url  # noqa: E402,F401  (fixtures of the objstore tests: a real Ceph RGW)


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test proves nothing: count it as a failure."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        print(f"\nCI: {skipped} test(s) skipped; a skipped test is a failure here")
        session.exitstatus = 1


LEVELS = ("pure", "lmdb", "fuse", "objstore", "libvirt")


def pytest_collection_modifyitems(config, items):
    """Every test module says its level (pytestmark = pytest.mark.<level>),
    so that `pytest -m pure` and `pytest -m "not libvirt"` select truly."""
    unmarked = sorted({item.module.__name__ for item in items
                       if not any(item.get_closest_marker(level) for level in LEVELS)})
    if unmarked:
        raise pytest.UsageError(f"test modules without a level marker ({', '.join(LEVELS)}): "
                                f"{', '.join(unmarked)}")
