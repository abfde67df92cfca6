"""The HTTP service as clients see it: a real uvicorn server (`ds4-agent serve`) on loopback with a tiny
checkpoint, driven by the official openai client and by raw HTTP for the malformed requests."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import jsonschema_rs
import openai
import pytest

from tests.servers import EXE, KEY, MODEL, free_port, request_json, serving


@pytest.fixture(scope="module")
def server(tiny_v3, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(tiny_v3, log, "--api-key", KEY, "--served-name", MODEL, "--max-body-mb", "1") as base:
        yield base


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, path, body: bytes | None = None, key: str | None = KEY, method=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return request_json(server + path, body, headers, method, timeout=60)


def test_models_list_the_served_checkpoint(client, tiny_v3):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "ds4"


def test_chat_completion_and_its_stream_agree(client, tiny_v3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    usage = whole.usage
    assert (
        1 <= usage.completion_tokens <= 12
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_a_repeated_prefix_is_served_from_the_cache(client):
    prefix = "Repository files:\n" + "\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(40))
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prefix + "\nQ1"}], max_tokens=2
    )
    second = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prefix + "\nQ2"}], max_tokens=2
    )
    assert first.usage.prompt_tokens > 200
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // 2  # the shared prefix was not computed again


def test_text_completion_and_fill_in_the_middle(client):
    plain = client.completions.create(model=MODEL, prompt="def quicksort(xs):", max_tokens=5, temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 5
    fim = client.completions.create(
        model=MODEL,
        prompt="def add(a, b):\n    return ",
        suffix="\n\nprint(add(1, 2))\n",
        max_tokens=5,
        temperature=0,
    )
    assert fim.choices[0].finish_reason in ("stop", "length") and fim.usage.prompt_tokens > 10
    streamed = list(client.completions.create(model=MODEL, prompt="import os", max_tokens=4, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    echoed = client.completions.create(
        model=MODEL, prompt="def quicksort(xs):", max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "def quicksort(xs):" + plain.choices[0].text
    echo_stream = client.completions.create(
        model=MODEL, prompt="def quicksort(xs):", max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in echo_stream if c.choices) == echoed.choices[0].text


def test_client_mistakes_arrive_as_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages[0].role",
        ),
        ("/v1/completions", b'{"prompt": [1, 99999999]}', 400, "prompt"),
        ("/v1/nowhere", b"{}", 404, None),
    ],
)
def test_malformed_requests_get_shaped_errors(server, path, body, status, param):
    code, answer = raw(server, path, body)
    assert code == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_no_token_is_401_and_health_stays_open(server):
    code, answer = raw(server, "/v1/models", key=None)
    assert code == 401 and answer["error"]["type"] == "authentication_error"
    assert raw(server, "/health", key=None) == (
        200,
        {"status": "ok", "model": MODEL, "engine": {"alive": True, "in_flight": 0}},
    )


def test_an_oversized_body_is_413_and_the_server_goes_on(server):
    import http.client

    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}).encode()
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    try:
        conn.request("POST", "/v1/chat/completions", big, headers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the whole body is sent: its answer still counts
    answer = conn.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["error"]["message"] == "request body too large"
    conn.close()
    assert raw(server, "/health")[0] == 200


def test_a_public_bind_without_keys_refuses_to_start(tiny_v3, monkeypatch):
    monkeypatch.delenv("DS4_API_KEYS", raising=False)
    done = subprocess.run(
        [EXE, "serve", "--model", str(tiny_v3), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0 without API keys" in done.stderr


def test_metrics_count_requests_tokens_and_the_cache(client, server):
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count me"}], max_tokens=3
    )
    raw(server, "/v1/models", key=None)  # a 401
    with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert values['ds4_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert values['ds4_requests_total{route="/v1/models",status="401"}'] >= 1
    assert (
        values['ds4_tokens_total{kind="completion"}'] >= 3 and values['ds4_tokens_total{kind="prompt"}'] > 0
    )
    assert 0 <= values["ds4_prefix_cache_hit_rate"] <= 1 and values["ds4_requests_in_flight"] == 0
    decoded = values['ds4_engine_tokens_total{kind="decoded"}']  # the first token is prefill's
    assert decoded >= 2 and values['ds4_engine_tokens_total{kind="prefilled"}'] > 0


def test_the_fix_loops_backend_talks_to_ds4s_own_server(server):
    from ds4.agent.backends import GenerationParams, OpenAIBackend

    backend = OpenAIBackend(server, MODEL, api_key=KEY)
    answer = backend.complete([{"role": "user", "content": "fix calc.py"}], GenerationParams(max_tokens=6))
    assert 1 <= answer.completion_tokens <= 6 and answer.prompt_tokens > 0


def test_rate_limits_answer_429_with_retry_after(tiny_v3, tmp_path):
    with serving(tiny_v3, tmp_path / "serve.log", "--rate-limit", "2") as base:
        statuses = [raw(base, "/v1/models", key=None)[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        request = urllib.request.Request(base + "/v1/models")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 429 and int(e.value.headers["Retry-After"]) >= 1
        assert json.loads(e.value.read())["error"]["code"] == "rate_limit_exceeded"


def test_the_openapi_schema_declares_the_routes_and_their_errors(server):
    with urllib.request.urlopen(server + "/schema/openapi.json", timeout=30) as r:
        schema = json.loads(r.read())
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "413", "429", "500"} <= set(chat["responses"])
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest"
    )
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["required"]
    assert {"/v1/models", "/v1/completions", "/health", "/metrics"} <= set(schema["paths"])


def test_the_schema_keeps_the_constraints_inside_unions(server, tiny_v3):
    with urllib.request.urlopen(server + "/schema/openapi.json", timeout=30) as r:
        schemas = json.loads(r.read())["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    vocab = json.loads((tiny_v3 / "config.json").read_text())["vocab_size"]
    ids = {"type": "integer", "minimum": 0, "maximum": vocab - 1}  # the served model's vocabulary
    assert {"type": "array", "items": ids, "minItems": 1} in prompt
    assert schemas["FixRequest"]["properties"]["rounds"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 20,
        "default": 3,
    }
    # the one cross-field rule the schema declares (a forced tool call needs tools), by the validator
    # schemathesis itself uses
    chat = {**schemas["ChatCompletionRequest"], "components": {"schemas": schemas}}
    ask = {"messages": [{"role": "user", "content": "x"}]}
    tool = {"type": "function", "function": {"name": "f"}}
    forced = {"type": "function", "function": {"name": "f"}}
    assert not jsonschema_rs.Draft202012Validator(chat).is_valid({**ask, "tool_choice": "required"})
    assert not jsonschema_rs.Draft202012Validator(chat).is_valid({**ask, "tool_choice": forced, "tools": []})
    assert jsonschema_rs.Draft202012Validator(chat).is_valid({**ask, "tool_choice": forced, "tools": [tool]})
    assert jsonschema_rs.Draft202012Validator(chat).is_valid({**ask, "tool_choice": "auto"})


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 1.0}', 200, None),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": 0}', 400, "stream"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "2"}', 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', 400, "max_tokens"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}',
            400,
            "messages[0].content[0].type",
        ),
    ],
)
def test_bodies_are_read_by_the_published_schemas_rules(server, body, status, param):
    """JSON Schema counts 1.0 as an integer; it does not count "2" as one, nor 0 as a boolean."""
    got, answer = raw(server, "/v1/chat/completions", body)
    assert got == status, answer
    if status != 200:
        assert answer["error"]["param"] == param


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """A second ds4 server in front of the first: its own key, the upstream's key for the upstream."""
    log = tmp_path_factory.mktemp("proxy") / "serve.log"
    flags = ["--endpoint", server, "--endpoint-key", KEY, "--api-key", "proxy-key", "--served-name", "relay"]
    with serving(None, log, *flags) as base:
        yield base


def test_serve_endpoint_relays_an_openai_compatible_server(client, proxy):
    relayed = openai.OpenAI(base_url=proxy + "/v1", api_key="proxy-key", max_retries=0, timeout=60)
    assert [m.id for m in relayed.models.list().data] == ["relay"]
    messages = [{"role": "user", "content": "def mul(a, b):"}]
    direct = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    via = relayed.chat.completions.create(model="relay", messages=messages, max_tokens=8, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    chunks = list(
        relayed.chat.completions.create(
            model="relay",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        direct.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
    text = relayed.completions.create(model="relay", prompt="import os", max_tokens=4, temperature=0)
    assert (
        text.choices[0].text
        == client.completions.create(model=MODEL, prompt="import os", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    with urllib.request.urlopen(proxy + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'ds4_tokens_total{kind="completion"}' in metrics and "ds4_cache_free_blocks" not in metrics
    assert "ds4_engine_tokens_total" not in metrics  # the engine behind the proxy is not ours to count


def test_serve_endpoint_keeps_the_errors_of_both_sides(proxy, tmp_path):
    relayed = openai.OpenAI(base_url=proxy + "/v1", api_key="proxy-key", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:  # refused by the relay's own schema
        relayed.chat.completions.create(model="relay", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # refused upstream, passed on as it was
        relayed.completions.create(model="relay", prompt=[10**6], max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy + "/v1", api_key="wrong", max_retries=0).models.list()


def test_serve_endpoint_with_a_wrong_upstream_key_or_url(server, tmp_path):
    log = tmp_path / "serve.log"
    with serving(None, log, "--endpoint", server, "--model-name", MODEL, "--endpoint-key", "nope") as base:
        status, answer = raw(
            base, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}'
        )
    assert (
        status == 502 and answer["error"]["code"] == "upstream_error" and "401" in answer["error"]["message"]
    )
    dead = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run([EXE, "serve", "--endpoint", dead], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "cannot list models" in run.stderr
