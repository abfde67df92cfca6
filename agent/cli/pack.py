"""`ds4-agent pack`: the repository and an issue packed into one prompt within a token budget."""

from __future__ import annotations

import json
import os
import sys

from ds4.agent.cli import DONE
from ds4.agent.cli.inputs import read_issue, require_dir
from ds4.agent.errors import InputError


def add_parser(sub) -> None:
    pack = sub.add_parser("pack")
    pack.add_argument("--repo", default=".")
    pack.add_argument("--db", default=None, help="index database (default: REPO/.ds4/index.db)")
    pack.add_argument("--issue", default="", help="the issue: a file, or - for standard input")
    pack.add_argument("--issue-text", default=None, help="the issue's text itself (instead of --issue)")
    pack.add_argument("--budget", type=int, default=128_000, help="tokens")
    which = pack.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint folder (its tokenizer.json counts tokens)")
    which.add_argument("--tokenizer", help="a tokenizer.json")
    pack.add_argument("--out", default=None, help="write the prompt here (default: standard output)")
    pack.add_argument("--manifest", default=None, help="write the manifest JSON here")
    pack.add_argument("--format", default="prompt", choices=["prompt", "markdown", "xml", "json"])


def run(args) -> int:
    from ds4.agent.index.indexer import default_db_path, index_repo
    from ds4.agent.index.store import open_index
    from ds4.agent.pack import TokenCounter, pack, render

    require_dir(args.repo)
    tokenizer = args.tokenizer or os.path.join(args.model, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise InputError(f"{tokenizer}: no tokenizer.json to count tokens with", "tokenizer")
    index_repo(args.repo, args.db)  # incremental: brings the index up to date first
    db = open_index(args.db or default_db_path(args.repo))
    packed = pack(
        db, args.repo, read_issue(args.issue, args.issue_text), args.budget, TokenCounter(tokenizer)
    )
    text = render(packed, args.format)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if args.manifest:
        with open(args.manifest, "w", encoding="utf-8") as f:
            json.dump(packed.manifest(), f, indent=2)
    _print_summary(packed, to=sys.stderr if not args.out else sys.stdout)
    return DONE


def _print_summary(packed, to) -> None:
    by_mode = {
        m: [f for f in packed.files if f.mode == m]
        for m in ("whole", "focused", "bodies", "skeleton", "listed")
    }
    print(
        f"{packed.total_tokens:,} of {packed.budget:,} tokens; "
        f"repository prefix {packed.repo_prefix_tokens:,}",
        file=to,
    )
    for mode, files in by_mode.items():
        print(f"  {mode:9} {len(files):6,} files {sum(f.tokens for f in files):10,} tokens", file=to)
    ranked = sorted((f for f in packed.files if f.why), key=lambda f: -f.score)[:5]
    for f in ranked:
        print(f"  top: {f.path} ({f.mode}, score {f.score}): {'; '.join(f.why[:3])}", file=to)
    for s in packed.secrets:
        print(f"  warning: possible {s['kind']} in {s['path']}:{s['line']}", file=to)
