"""Loaded by schemathesis (SCHEMATHESIS_HOOKS) in test_api_schema: its check that schema-valid requests
are accepted, less the two refusals no JSON Schema can express. A prompt longer than the served
model's context (it depends on the tokenizer and the model) and a tool_choice naming a tool the request
does not offer (a cross-field equality) are 400s by design, as OpenAI's; any other 400 still fails."""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

CANNOT_BE_DECLARED = {("messages", "context_length_exceeded"), ("prompt", "context_length_exceeded")}
CANNOT_BE_DECLARED |= {("tool_choice", "tool_not_offered")}


@schemathesis.check
def schema_valid_requests_accepted(ctx, response, case):
    if response.status_code == 400:
        try:
            error = json.loads(response.content)["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
        if (error.get("param"), error.get("code")) in CANNOT_BE_DECLARED:
            return None
    return positive_data_acceptance(ctx, response, case)
