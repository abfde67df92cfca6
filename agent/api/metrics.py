"""Prometheus text for /metrics, and per-key request rate limits."""

from __future__ import annotations

import threading
import time
from collections import Counter

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/repos",
    "/v1/fix",
    "/v1/jobs",
    "/health",
    "/metrics",
    "/schema",
)


def route_label(path: str) -> str:
    return next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")


def _count(value) -> int:
    return value if isinstance(value, int) and value >= 0 else 0  # a proxied endpoint's usage may lack some


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (route, status) -> count
        self.tokens: Counter = Counter()  # prompt | completion | cached

    def count_request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(route_label(path), status)] += 1

    def count_usage(self, usage: dict) -> None:
        with self.lock:
            self.tokens["prompt"] += _count(usage.get("prompt_tokens"))
            self.tokens["completion"] += _count(usage.get("completion_tokens"))
            self.tokens["cached"] += _count((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))

    def render(self, engine_stats: dict | None, in_flight: int, jobs: dict[str, int] | None = None) -> str:
        lines = [
            "# HELP ds4_requests_total HTTP requests by route and status.",
            "# TYPE ds4_requests_total counter",
        ]
        with self.lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'ds4_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += [
                "# HELP ds4_tokens_total Tokens: prompt, completion, cached (reused prompt).",
                "# TYPE ds4_tokens_total counter",
                *(
                    f'ds4_tokens_total{{kind="{k}"}} {self.tokens[k]}'
                    for k in ("prompt", "completion", "cached")
                ),
            ]
        if engine_stats is None:  # a proxied endpoint: the hit rate its usage reports
            prompt, cached = self.tokens["prompt"], self.tokens["cached"]
            engine_stats = {"prefix_hit_rate": cached / prompt if prompt else 0.0}
        lines += [
            "# HELP ds4_prefix_cache_hit_rate Prompt tokens reused from the prefix cache, as a share.",
            "# TYPE ds4_prefix_cache_hit_rate gauge",
            f"ds4_prefix_cache_hit_rate {engine_stats['prefix_hit_rate']:.6f}",
            "# HELP ds4_requests_in_flight Generation requests queued or running in the engine.",
            "# TYPE ds4_requests_in_flight gauge",
            f"ds4_requests_in_flight {in_flight}",
        ]
        if "free_blocks" in engine_stats:
            lines += [
                "# HELP ds4_cache_free_blocks Free blocks of the paged KV cache.",
                "# TYPE ds4_cache_free_blocks gauge",
                f"ds4_cache_free_blocks {engine_stats['free_blocks']}",
                "# HELP ds4_preemptions_total Sequences preempted under cache pressure.",
                "# TYPE ds4_preemptions_total counter",
                f"ds4_preemptions_total {engine_stats['preemptions']}",
                "# HELP ds4_engine_tokens_total Tokens the engine computed: prefilled, decoded (as they go).",
                "# TYPE ds4_engine_tokens_total counter",
                f'ds4_engine_tokens_total{{kind="prefilled"}} {engine_stats["tokens_prefilled"]}',
                f'ds4_engine_tokens_total{{kind="decoded"}} {engine_stats["tokens_decoded"]}',
            ]
        if jobs is not None:
            lines += ["# HELP ds4_jobs Fix jobs by state.", "# TYPE ds4_jobs gauge"]
            lines += [f'ds4_jobs{{state="{state}"}} {n}' for state, n in jobs.items()]
        return "\n".join(lines) + "\n"


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int):
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> float:
        """0 when the request may go; otherwise the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            level, last = self.buckets.get(key, (self.capacity, now))
            level = min(self.capacity, level + (now - last) * self.rate)
            if level >= 1:
                self.buckets[key] = (level - 1, now)
                return 0.0
            self.buckets[key] = (level, now)
            return (1 - level) / self.rate
