"""`ds4-agent serve --endpoint URL`: the same server (keys, limits, schema, agent API, metrics) in front of
another OpenAI-compatible endpoint (vLLM, SGLang, a hosted API, another ds4). Requests are checked
against ds4's schema first, so clients see ds4's errors; then their JSON goes upstream as sent, with the
upstream's model name and key, and the answer (or stream) comes back."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx

from ds4.agent.api.errors import APIError
from ds4.agent.backends import sse_data
from ds4.agent.probe import choose_model, list_models


class ProxiedModel:
    def __init__(
        self,
        endpoint: str,
        upstream_model: str | None = None,
        api_key: str | None = None,
        name: str | None = None,
        timeout: float = 600.0,
    ):
        self.base = endpoint.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.timeout = api_key, timeout
        self.upstream_model = upstream_model or self._first_model()
        self.name = name or self.upstream_model
        self.created = int(time.time())
        self.max_model_len = None  # the upstream's business
        self.num_in_flight = 0

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _first_model(self) -> str:
        """The upstream's first model, asked once at start-up (so a wrong URL fails now, not later)."""
        return choose_model(list_models(self.base, self.api_key, "--endpoint-key"), None, self.base).id

    def stats(self) -> None:
        return None  # no engine here: /metrics reports what the responses' usage says

    def shutdown(self) -> None:
        pass

    async def forward(self, route: str, body: dict) -> dict:
        """A non-streaming request; the upstream's JSON answer."""
        self.num_in_flight += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await self._send(client, route, body, stream=False)
                return response.json()
        finally:
            self.num_in_flight -= 1

    async def open_stream(self, route: str, body: dict) -> AsyncIterator[dict | str]:
        """A streaming request: opened (and its status checked) before the first chunk is promised, then
        each `data:` payload, parsed, ending with "[DONE]"."""
        client = httpx.AsyncClient(timeout=self.timeout)
        try:
            response = await self._send(client, route, body, stream=True)
        except BaseException:
            await client.aclose()
            raise
        self.num_in_flight += 1

        async def chunks() -> AsyncIterator[dict | str]:
            try:
                async for line in response.aiter_lines():
                    data = sse_data(line)
                    if data == "[DONE]":
                        break
                    if data is not None:
                        yield json.loads(data)
                yield "[DONE]"
            finally:
                self.num_in_flight -= 1
                await response.aclose()
                await client.aclose()

        return chunks()

    async def _send(self, client: httpx.AsyncClient, route: str, body: dict, stream: bool) -> httpx.Response:
        url = self.base + route
        request = client.build_request(
            "POST", url, json={**body, "model": self.upstream_model}, headers=self._headers()
        )
        try:
            response = await client.send(request, stream=stream)
        except httpx.TimeoutException:
            raise APIError(
                504, f"the endpoint {url} did not answer in time", None, "upstream_timeout"
            ) from None
        except httpx.HTTPError as e:
            raise APIError(
                502, f"cannot reach the endpoint {url}: {e}", None, "upstream_unreachable"
            ) from None
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise _upstream_error(url, response)
        return response


def _upstream_error(url: str, response: httpx.Response) -> APIError:
    """The upstream's own OpenAI-shaped error when it sent one (a client's mistake stays a 4xx); its
    failures become 502."""
    status = response.status_code
    try:
        detail = response.json().get("error") or {}
    except ValueError:
        detail = {}
    if not isinstance(detail, dict):
        detail = {}
    message = detail.get("message") or response.text[:300]
    if status >= 500 or status in (
        401,
        403,
    ):  # the upstream's key is the operator's business, not the client's
        return APIError(502, f"the endpoint {url} answered {status}: {message}", None, "upstream_error")
    return APIError(status, message, detail.get("param"), detail.get("code"))
