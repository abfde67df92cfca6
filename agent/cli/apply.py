"""`ds4-agent apply`: a model's edits (SEARCH/REPLACE or unified diff) applied all or nothing, said in a
line or, with --json, as {"status": applied|checked|refused, "edits": [{"block", "path", "how"}],
"files": [{"path", "deleted"}], "error"}."""

from __future__ import annotations

import json

from ds4.agent.cli import DONE, NOT_RESOLVED
from ds4.agent.cli.inputs import read_text, require_dir


def add_parser(sub) -> None:
    apply = sub.add_parser("apply")
    apply.add_argument("edits", help="a file with the model's answer, or - for standard input")
    apply.add_argument("--repo", default=".")
    apply.add_argument("--check", action="store_true", help="only check that every edit applies and lints")
    apply.add_argument("--no-lint", action="store_true", help="skip the syntax check of edited files")
    apply.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from ds4.agent.patch import PatchError, apply, parse

    require_dir(args.repo)
    text = read_text(args.edits)
    try:
        edits = parse(text)
        result = apply(edits, args.repo, write=not args.check, lint=not args.no_lint)
    except PatchError as e:
        if args.json:
            print(json.dumps({"status": "refused", "edits": [], "files": [], "error": str(e)}, indent=2))
        else:
            print(f"refused: {e}")
        return NOT_RESOLVED
    if args.json:
        print(json.dumps(_as_json(edits, result, args.check), indent=2))
        return DONE
    verb = "would apply" if args.check else "applied"
    print(
        f"{verb} {len(result.applied)} edit(s) to {len(result.files)} file(s): "
        + ", ".join(f"{p}{' (deleted)' if t is None else ''}" for p, t in sorted(result.files.items()))
    )
    return DONE


def _as_json(edits, result, checked: bool) -> dict:
    by_index = {edit.index: edit for edit in edits}

    def placed(i: int) -> dict:
        edit = by_index[i]
        return {"block": i, "path": edit.path, "how": result.how[i]} | (
            {"renamed_to": edit.new_path} if edit.new_path else {}
        )

    return {
        "status": "checked" if checked else "applied",
        "edits": [placed(i) for i in result.applied],
        "files": [{"path": p, "deleted": t is None} for p, t in sorted(result.files.items())],
        "error": None,
    }
