"""`ds4-agent index`, `search` and `symbols`: the repository index, built (and watched) and queried."""

from __future__ import annotations

import json
import os
import sys

from ds4.agent.cli import DONE, NOT_RESOLVED
from ds4.agent.cli.inputs import require_dir
from ds4.agent.errors import InputError


def add_parser(sub) -> None:
    _add_index(sub)
    _add_search(sub)
    _add_symbols(sub)


def run(args) -> int:
    return {"index": _index, "search": _search, "symbols": _symbols}[args.command](args)


def _add_index(sub) -> None:
    index = sub.add_parser("index")
    index.add_argument("--repo", default=".", help="repository folder (default: the current one)")
    index.add_argument("--db", default=None, help="index database (default: REPO/.ds4/index.db)")
    index.add_argument("--max-file-mb", type=float, default=1.0, help="skip files larger than this")
    index.add_argument("--watch", action="store_true", help="then keep the index fresh until interrupted")
    index.add_argument("--poll", action="store_true", help="with --watch: poll instead of file events")
    index.add_argument("--json", action="store_true")


def _index(args) -> int:
    from ds4.agent.index.indexer import index_repo

    require_dir(args.repo)
    report = index_repo(args.repo, args.db, max_bytes=int(args.max_file_mb * (1 << 20)), progress=_progress)
    if args.json:
        print(json.dumps(report.__dict__, indent=2), flush=True)
    else:
        _print_index_report(report)
    if args.watch:
        _watch(args)
    return DONE


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rindexing {done}/{total} changed files", end="" if done < total else "\n", file=sys.stderr)


def _print_index_report(report) -> None:
    langs = ", ".join(f"{name} {n}" for name, n in list(report.languages.items())[:8])
    skipped = ", ".join(f"{reason}: {n}" for reason, n in report.skipped.items()) or "none"
    print(
        f"{report.files} files ({report.parsed} parsed, {report.unchanged} unchanged, "
        f"{report.removed} removed) in {report.seconds:.2f}s\nlanguages: {langs}\n"
        f"{report.definitions} definitions, {report.references} references\nskipped: {skipped}"
    )


def _watch(args) -> None:
    import time

    from ds4.agent.index.watcher import RepoWatcher

    def show(report) -> None:
        changed = ", ".join(report.parsed_paths[:5]) + (" ..." if len(report.parsed_paths) > 5 else "")
        print(
            f"updated: {report.parsed} parsed ({changed}), {report.removed} removed in {report.seconds:.2f}s",
            flush=True,
        )

    watcher = RepoWatcher(args.repo, args.db, on_update=show, polling=args.poll)
    watcher.start()
    print(f"watching {os.path.abspath(args.repo)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        watcher.stop()


def _add_search(sub) -> None:
    search = sub.add_parser("search")
    search.add_argument("query")
    search.add_argument("--repo", default=".")
    search.add_argument("--db", default=None, help="index database (default: REPO/.ds4/index.db)")
    search.add_argument("--kind", default=None, help="function, method, class, interface, struct, ...")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--json", action="store_true")


def _search(args) -> int:
    from ds4.agent.index.query import search

    rows = search(_open_existing_index(args), args.query, args.kind, args.limit)
    _print_rows(rows, args.json)
    return DONE if rows else NOT_RESOLVED  # like ripgrep: nothing found is exit 1


def _add_symbols(sub) -> None:
    symbols = sub.add_parser("symbols")
    symbols.add_argument("path", nargs="?", default=None, help="a file, relative to the repository")
    symbols.add_argument("--repo", default=".")
    symbols.add_argument("--db", default=None, help="index database (default: REPO/.ds4/index.db)")
    symbols.add_argument("--json", action="store_true")


def _symbols(args) -> int:
    from ds4.agent.index.query import symbols

    rows = symbols(_open_existing_index(args), args.path)
    _print_rows(rows, args.json)
    return DONE if rows else NOT_RESOLVED


def _open_existing_index(args):
    from ds4.agent.index.indexer import default_db_path
    from ds4.agent.index.store import open_index

    require_dir(args.repo)
    path = args.db or default_db_path(args.repo)
    if not os.path.exists(path):
        raise InputError(f"no index at {path}: run `ds4-agent index --repo {args.repo}` first")
    return open_index(path, write=False)


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['path']}:{r['line']}: {r['kind']} {r['name']}  {r['signature']}")
