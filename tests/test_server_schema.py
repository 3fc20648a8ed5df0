"""Schemathesis against the server's own OpenAPI schema: requests generated from every operation's
schema, valid and invalid, each must get an answer that is not a server error, and the server must stay
healthy. The budget per operation is bounded (SCHEMA_EXAMPLES, 25 by default)."""

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serving import AUTH, running_server, tiny_checkpoint

OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
              "GET /v1/models", "GET /health", "GET /metrics"]
BUDGET = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "top_logprobs": 2, "logprobs": 2}


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("schema"))
    with running_server(ckpt, "--max-queue", "64") as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
        schema.config.update(base_url=url, headers=AUTH)
        yield url, schema


def bounded(body):
    """Generated requests keep their shape; only what makes them slow is capped."""
    if isinstance(body, dict):
        for key, cap in BUDGET.items():
            if isinstance(body.get(key), int) and not isinstance(body[key], bool):
                body[key] = max(min(body[key], cap), -1)
    return body


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_never_get_a_server_error(schema, label):
    url, schema = schema
    op = schema.find_operation_by_label(label)
    assert op is not None, label
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=int(os.environ.get("SCHEMA_EXAMPLES", "25")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case):
        case.body = bounded(case.body)
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)

    run()
    assert httpx.get(f"{url}/health").status_code == 200
