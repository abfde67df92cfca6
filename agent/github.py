"""A GitHub issue URL as the issue text: the title, the body and the comments, through the REST API.

GITHUB_TOKEN (or GH_TOKEN) is sent when set: it lifts the anonymous rate limit and opens private
repositories. DS4_GITHUB_API points at another API root (GitHub Enterprise: https://HOST/api/v3).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

from ds4.agent.errors import GitHubError

ISSUE_URL = re.compile(
    r"^https?://(?:www\.)?github\.com/([\w.-]+)/([\w.-]+)/(?:issues|pull)/(\d+)/?(?:[#?].*)?$"
)


def is_issue_url(value: str) -> bool:
    return bool(ISSUE_URL.match(value.strip()))


def fetch_issue(url: str, timeout: float = 30.0) -> str:
    match = ISSUE_URL.match(url.strip())
    if match is None:
        raise GitHubError(f"{url} is not a GitHub issue URL (https://github.com/OWNER/REPO/issues/N)")
    owner, repo, number = match.groups()
    api = os.environ.get("DS4_GITHUB_API", "https://api.github.com").rstrip("/")
    issue = _get(f"{api}/repos/{owner}/{repo}/issues/{number}", timeout)
    comments = _get(f"{api}/repos/{owner}/{repo}/issues/{number}/comments?per_page=100", timeout)
    title = f"# {(issue.get('title') or '').strip()} ({owner}/{repo}#{number})"
    parts = [title, (issue.get("body") or "").strip()]
    for comment in comments:
        author = (comment.get("user") or {}).get("login", "someone")
        parts.append(f"## Comment by {author}\n\n{(comment.get('body') or '').strip()}")
    return "\n\n".join(p for p in parts if p) + "\n"


def _get(url: str, timeout: float):
    headers = {"Accept": "application/vnd.github+json", "User-Agent": "ds4-agent"}
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        hint = {
            401: "the token in GITHUB_TOKEN was rejected",
            403: "rate-limited or forbidden: set GITHUB_TOKEN",
            404: "no such issue (a private repository needs GITHUB_TOKEN)",
        }.get(e.code, e.reason)
        raise GitHubError(f"GitHub answered {e.code} for {url}: {hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise GitHubError(
            f"cannot reach {url} ({reason}): save the issue text to a file and pass that instead"
        ) from None
    except json.JSONDecodeError:
        raise GitHubError(f"{url} did not answer JSON") from None
