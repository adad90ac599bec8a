"""A bounded schemathesis run against a live gateway on loopback (null engine behind it): requests generated
from GET /openapi.json, valid and invalid, whose answers must be documented (status, media type, headers,
body schema), never a 5xx, and invalid bodies rejected."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks  # noqa: E402

from live.engines.null_server import NullEngineProcess  # noqa: E402
from live.gateway import REQUEST_ID_HEADER, Gateway  # noqa: E402
from live.gateway_openapi import openapi_document  # noqa: E402
from tests.live_gateway.conftest import ADMIN_TOKEN, MODEL, GatewayServer, serving, static_config  # noqa: E402

# generated requests per operation and mode: 30 by default, the 1,000 in CI (.ci/run sets it)
MAX_EXAMPLES = int(os.environ.get("TIERLAB_FUZZ_EXAMPLES", "30"))
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]


@pytest.fixture(scope="module")
def gateway(null_engines: Callable[..., NullEngineProcess]) -> Iterator[GatewayServer]:
    """A gateway on loopback with `tiny` on a null engine."""
    engine = null_engines()
    gw = Gateway(static_config())
    with serving(gw) as gs:
        gw.adopt_instance(MODEL, "s0", engine.url)  # no request is in flight yet
        yield gs


def _cases() -> list[Any]:
    """(operation, generation mode) pairs: every operation with valid input, those with a body also invalid."""
    schema = schemathesis.openapi.from_dict(openapi_document(REQUEST_ID_HEADER))
    operations = [result.ok() for result in schema.get_all_operations()]
    positive = schemathesis.GenerationMode.POSITIVE
    return [pytest.param(op, mode, id=f"{op.label}-{mode.value}") for op in operations
            for mode in schemathesis.GenerationMode if mode is positive or op.method == "post"]


@pytest.mark.parametrize(("operation", "mode"), _cases())
def test_generated_requests_get_documented_answers(gateway: GatewayServer, operation: Any,
                                                   mode: schemathesis.GenerationMode) -> None:
    """`MAX_EXAMPLES` generated requests of `operation` (schema-valid or -invalid per `mode`), with a valid token."""
    token = ADMIN_TOKEN if operation.path.startswith("/admin/") else "sk-alice"

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=gateway.url, headers={"authorization": f"Bearer {token}"}, checks=CHECKS,
                               timeout=30)

    t0 = time.monotonic()
    run()
    assert httpx.get(gateway.url + "/healthz", timeout=10).status_code == 200  # alive after every generated case
    print(f"{operation.label} ({mode.value}): {MAX_EXAMPLES} generated requests in {time.monotonic() - t0:.1f} s")
