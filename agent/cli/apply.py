"""`ds4-agent apply`: a model's edits (SEARCH/REPLACE or unified diff) applied all or nothing."""

from __future__ import annotations

from ds4.agent.cli import DONE, NOT_RESOLVED
from ds4.agent.cli.inputs import read_text, require_dir


def add_parser(sub) -> None:
    apply = sub.add_parser("apply")
    apply.add_argument("edits", help="a file with the model's answer, or - for standard input")
    apply.add_argument("--repo", default=".")
    apply.add_argument("--check", action="store_true", help="only check that every edit applies and lints")
    apply.add_argument("--no-lint", action="store_true", help="skip the syntax check of edited files")


def run(args) -> int:
    from ds4.agent.patch import PatchError, apply

    require_dir(args.repo)
    try:
        result = apply(read_text(args.edits), args.repo, write=not args.check, lint=not args.no_lint)
    except PatchError as e:
        print(f"refused: {e}")
        return NOT_RESOLVED
    verb = "would apply" if args.check else "applied"
    print(
        f"{verb} {len(result.applied)} edit(s) to {len(result.files)} file(s): "
        + ", ".join(f"{p}{' (deleted)' if t is None else ''}" for p, t in sorted(result.files.items()))
    )
    return DONE
