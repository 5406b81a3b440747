"""The chart's RBAC audit records a real operator run against the test API server."""

from tests.support.kube.conftest import apiserver  # noqa: F401  (the fixture)
