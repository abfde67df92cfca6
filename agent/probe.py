"""What an OpenAI-compatible endpoint serves, asked before anything runs: its models from GET /v1/models
(each with its context where the server reports one, as vLLM and ds4 do in `max_model_len`) and the model a
run asks for. Each failure a user can fix (nothing listening, a refused key, a model the server does not
serve) is one BackendError that says what to do. It sends no chat request and owns no backend."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from ds4.agent.errors import BackendError

TIMEOUT = 30.0  # seconds: listing models is quick on any live server


@dataclass(frozen=True)
class ListedModel:
    id: str
    max_model_len: int | None = None  # the context, when the server says


def models_url(endpoint: str) -> str:
    """GET /v1/models of an endpoint given as its root, its /v1 or its /v1/chat/completions."""
    base = endpoint.rstrip("/").removesuffix("/chat/completions")
    return (base if base.endswith("/v1") else base + "/v1") + "/models"


def list_models(
    endpoint: str, api_key: str | None, key_from: str = "DS4_API_KEY or OPENAI_API_KEY"
) -> list[ListedModel]:
    """The models the endpoint lists, in its order; `key_from` says where the key comes from, for the
    message when the server refuses it."""
    url = models_url(endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT) as r:
            data = json.load(r).get("data")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise BackendError(
                f"{url} refused the API key ({e.code}): set {key_from} to a key this server accepts"
            ) from None
        raise BackendError(f"{url} answered {e.code}: is {endpoint} an OpenAI-compatible server?") from None
    except (urllib.error.URLError, OSError) as e:
        raise BackendError(
            f"cannot reach {url} ({getattr(e, 'reason', e)}), so cannot list models: "
            "start the server or correct --endpoint"
        ) from None
    except (ValueError, AttributeError):
        raise BackendError(f"{url} did not answer a model list: is {endpoint} OpenAI-compatible?") from None
    return [_listed(entry) for entry in data or [] if isinstance(entry, dict) and entry.get("id")]


def _listed(entry: dict) -> ListedModel:
    context = entry.get("max_model_len")
    is_context = isinstance(context, int) and not isinstance(context, bool) and context > 0
    return ListedModel(str(entry["id"]), context if is_context else None)


def choose_model(models: list[ListedModel], name: str | None, endpoint: str) -> ListedModel:
    """The model named, or with no name the endpoint's first (as `serve --endpoint` does)."""
    if not models:
        raise BackendError(f"{models_url(endpoint)} lists no model: pass --model-name")
    if name is None:
        return models[0]
    for model in models:
        if model.id == name:
            return model
    served = ", ".join(m.id for m in models[:8]) + (" ..." if len(models) > 8 else "")
    raise BackendError(
        f"{endpoint} serves no model {name!r}: pass --model-name with one it serves ({served}), "
        "or leave it out for the first"
    )
