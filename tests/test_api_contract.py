"""The published API contract (`GET /openapi.json`) against the live service: schemathesis generates
requests for every documented operation; none may answer 5xx, and every answer must match the
document (status code, content type, body). Bounded in examples so the default suite stays lean."""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

# Generated images are random bytes, so 400 is the right answer and "valid data is accepted" is not
# among the checks; everything about the shape of the answers is.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def document(service):
    return httpx.get(f"{service}/openapi.json").json()


def test_the_document_names_every_route(document):
    assert document["openapi"].startswith("3.") and set(document["paths"]) == {
        "/search", "/search/vector", "/embed", "/images", "/images/{id}", "/images/{id}/thumbnail", "/healthz", "/stats",
        "/openapi.json", "/", "/ui/{name}"}


def test_no_5xx_and_every_answer_matches_the_schema(service, document):
    schema = schemathesis.openapi.from_dict(document)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == 14
    for op in operations:
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            case.call_and_validate(base_url=service, checks=CHECKS, timeout=60)

        check()
