"""The serving API fuzzed from its own OpenAPI schema with schemathesis: no 5xx, answers as documented.

Every operation gets generated requests, valid ones (image bodies, multipart forms of the
declared shape) and invalid ones (wrong types, missing parts), through the real app in this
process, with schemathesis' default checks: no server error, and status code, content type,
headers and body all as the schema says. (The test drives schemathesis' strategies with
hypothesis itself: `schemathesis.pytest.from_fixture` fails under pytest 9.)
"""

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import require
from mnist_flax import checkpoint

schemathesis = require("schemathesis", "pip install schemathesis (the test extra)")
require("fastapi", "pip install 'mnist-flax[serve]'")
from schemathesis.generation import GenerationMode  # noqa: E402

from mnist_flax import api  # noqa: E402

EXAMPLES = 50  # per operation and mode; CI's derandomized profile runs the same ones every time


@pytest.fixture(scope="module")
def api_schema(trained_checkpoint):
    variables, record = checkpoint.load_checkpoint(trained_checkpoint)
    app = api.create_app(variables, api.describe(trained_checkpoint, record, variables), checkpoint.network_for(record))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_the_api_keeps_to_its_schema(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /", "POST /api/predict", "GET /api/model", "GET /healthz"}
    cases = 0
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # they take no parameters, so there is nothing to make invalid
        @given(operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case):
            nonlocal cases
            cases += 1
            response = case.call_and_validate()
            # schemathesis.toml lets a schema-valid request get a 400, for an image with no digit.
            # Only for the image itself, though: that message names the upload, where a refused
            # envelope would name the content type or the form.
            if mode is GenerationMode.POSITIVE and response.status_code >= 400:
                assert response.status_code == 400, response.text
                assert response.json()["error"].startswith(api.UPLOAD_NAME + ":"), response.text

        call()
    print(f"schemathesis: {cases} {mode.value} cases, no failure")
    assert cases >= EXAMPLES
