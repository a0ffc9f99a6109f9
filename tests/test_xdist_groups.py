"""The suite's own set-up: modules marked `xdist_group` really run on one worker.

pytest 9.2 silently broke pytest-xdist 3.8's `--dist=loadgroup` (pytest-xdist#1386: the
group suffix xdist adds to a test's node id no longer takes, so groups are split across
workers and each worker builds the module's expensive fixtures again). requirements-dev.txt
pins pytest below 9.2; this test fails if grouping stops working again.
"""
import os

import pytest


@pytest.mark.xdist_group("probe")
def test_a_grouped_test_carries_its_group_under_xdist(request):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not running under pytest-xdist (`-n 2`)")
    assert request.node.nodeid.endswith("@probe"), (
        f"{request.node.nodeid}: --dist=loadgroup did not group this test (pytest "
        f"{pytest.__version__}; see pytest-xdist#1386)")
