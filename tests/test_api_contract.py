"""The published API contract (`GET /openapi.json`) against the live service: schemathesis sends
generated requests to every documented operation; none may answer 5xx, and every answer must match
the document (status code, content type, body). Bounded in examples so the default suite stays lean."""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(f"{service}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def test_the_document_names_every_route(service):
    doc = httpx.get(f"{service}/openapi.json").json()
    assert doc["openapi"].startswith("3.") and set(doc["paths"]) == {
        "/search", "/search/vector", "/embed", "/images/{id}", "/healthz", "/stats", "/openapi.json"}


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_5xx_and_every_answer_matches_the_schema(case):
    # Generated images are random bytes: 400 is the right answer, so "valid data must be accepted"
    # is not among the checks; everything about the shape of the answers is.
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])
