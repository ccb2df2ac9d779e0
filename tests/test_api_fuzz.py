"""Schemathesis against the real server's /openapi.json (bench/api_fuzz.py; docs/serve.md has the 1,000-case run)."""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis", reason="the API fuzz needs the dev extra (schemathesis)")

from bench.api_fuzz import KEY, fuzz
from serve.background import BackgroundServer
from serve.config import ServeConfig


@pytest.mark.slow
def test_schema_generated_requests_get_no_server_error_and_mostly_reach_the_model(tiny_model_dir):
    config = ServeConfig(model=str(tiny_model_dir), api_key=KEY, max_tokens_limit=4, max_regions=8,
                         request_timeout_s=120)
    with BackgroundServer(config) as server:
        reports = {r.label: r for r in fuzz(server.url, cases=100, seed=1)}
    for report in reports.values():
        assert not any(status.startswith("5") for status in report.statuses), (report.label, report.statuses)
        assert not [f for f in report.failures if "Schema-valid request rejected" not in f], report.failures
    describe = reports["POST /v1/regions/describe"]
    assert describe.cases >= 90 and describe.reached_model > describe.cases / 2, describe.statuses
    assert reports["POST /v1/chat/completions"].cases >= 90
