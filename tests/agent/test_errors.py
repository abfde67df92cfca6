"""The agent's error family: every error class the agent defines derives from AgentError, there is one
Cancelled, and the engine's parameter errors name their parameter (the API reports it as `param`)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import ds4.agent
from ds4.agent.errors import AgentError, Cancelled, InputError
from ds4.engine.errors import EngineError, ParamError
from ds4.engine.sampler import SamplingParams


def agent_modules():
    for info in pkgutil.walk_packages(ds4.agent.__path__, "ds4.agent."):
        yield importlib.import_module(info.name)


def test_every_agent_error_is_an_agent_error():
    defined = {
        (module.__name__, name): cls
        for module in agent_modules()
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__
    }
    assert len(defined) >= 15, sorted(defined)
    assert [key for key, cls in defined.items() if not issubclass(cls, AgentError)] == []


def test_one_cancelled_for_the_api_and_the_editor():
    from ds4.agent.api import job_runner
    from ds4.lsp import fix

    assert job_runner.Cancelled is Cancelled and fix.Cancelled is Cancelled


def test_input_errors_name_their_field_and_stay_value_errors():
    error = InputError("the issue is empty", "issue")
    assert error.param == "issue" and isinstance(error, ValueError) and str(error) == "the issue is empty"


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -1),
        ("min_p", 1.0),
        ("max_tokens", 0),
        ("stop", ("",)),
    ],
)
def test_sampling_errors_name_their_parameter(field, value):
    with pytest.raises(ParamError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value) and isinstance(e.value, EngineError)
