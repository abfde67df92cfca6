"""The patcher on a corpus of real edits (ds4's own history), each given in many forms and with the
usual model noise: the intended text comes out; ambiguous or wrong edits are refused, tree untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds4.agent.patch import PatchError, apply, parse

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "patch_corpus" / "corpus.json").read_text())


def expected(case) -> str:
    b, s = case["before"], case["start"] - 1
    return "\n".join(b[:s] + case["new"] + b[s + len(case["old"]) :]) + "\n"


def search_replace(path, old, new, fence=True, prose=True):
    block = (
        f"{path}\n"
        + ("```python\n" if fence else "")
        + "<<<<<<< SEARCH\n"
        + "".join(l + "\n" for l in old)
        + "=======\n"
        + "".join(l + "\n" for l in new)
        + ">>>>>>> REPLACE\n"
        + ("```\n" if fence else "")
    )
    return (
        ("I found the problem. Here is the change:\n\n" + block + "\nThis should fix it.\n")
        if prose
        else block
    )


def unified(path, case, shift=0, prefixes=True, counts=True):
    a, b = ("a/", "b/") if prefixes else ("", "")
    body = []
    old, new = case["old"], case["new"]
    matcher = __import__("difflib").SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            body += [" " + l for l in old[i1:i2]]
        else:
            body += ["-" + l for l in old[i1:i2]] + ["+" + l for l in new[j1:j2]]
    header = (
        f"@@ -{case['start'] + shift},{len(old)} +{case['start'] + shift},{len(new)} @@"
        if counts
        else f"@@ -{case['start'] + shift} +{case['start'] + shift} @@"
    )
    return f"--- {a}{path}\n+++ {b}{path}\n{header}\n" + "\n".join(body) + "\n"


FORMS = {
    "search/replace in a fence with prose": lambda c: search_replace(c["path"], c["old"], c["new"]),
    "bare search/replace": lambda c: search_replace(c["path"], c["old"], c["new"], fence=False, prose=False),
    "unified diff": lambda c: unified(c["path"], c),
    "diff, no a/ b/, shifted lines, no counts": lambda c: unified(
        c["path"], c, shift=7, prefixes=False, counts=False
    ),
    "CRLF answer": lambda c: search_replace(c["path"], c["old"], c["new"]).replace("\n", "\r\n"),
    "trailing spaces in SEARCH": lambda c: search_replace(c["path"], [l + "  " for l in c["old"]], c["new"]),
    "diff inside a fence": lambda c: "```diff\n" + unified(c["path"], c) + "```\n",
}


def test_corpus_is_large_and_real():
    assert len(CORPUS) >= 100 and all(c["source"].startswith("ds4@") for c in CORPUS)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_corpus_edit_reproduces_the_intended_file(tmp_path, form):
    failures = []
    for n, case in enumerate(CORPUS):
        root = tmp_path / f"{n}"
        root.mkdir()
        (root / case["path"]).write_text("\n".join(case["before"]) + "\n")
        try:
            apply(FORMS[form](case), root, lint=False)
        except PatchError as e:
            failures.append(f"{case['source']}: {e}")
            continue
        if (root / case["path"]).read_text() != expected(case):
            failures.append(f"{case['source']}: wrong result")
    assert not failures, f"{len(failures)}/{len(CORPUS)} failed, e.g.\n" + "\n".join(failures[:3])


def test_reindented_search_is_placed_at_the_real_indentation(tmp_path):
    cases = [c for c in CORPUS if all(l.startswith("    ") or not l.strip() for l in c["old"] + c["new"])]
    assert len(cases) >= 20
    for n, case in enumerate(cases):
        root = tmp_path / f"{n}"
        root.mkdir()
        (root / case["path"]).write_text("\n".join(case["before"]) + "\n")
        dedent = [l[4:] if l.strip() else l for l in case["old"]]
        apply(
            search_replace(case["path"], dedent, [l[4:] if l.strip() else l for l in case["new"]]),
            root,
            lint=False,
        )
        assert (root / case["path"]).read_text() == expected(case), case["source"]


def test_elided_search_keeps_the_middle(tmp_path):
    (tmp_path / "m.py").write_text("def f(x):\n    a = 1\n    b = 2\n    c = 3\n    return a + b + c\n")
    answer = search_replace(
        "m.py",
        ["def f(x):", "    ...", "    return a + b + c"],
        ["def f(x):", "    ...", "    return a * b * c"],
    )
    apply(answer, tmp_path)
    assert (
        tmp_path / "m.py"
    ).read_text() == "def f(x):\n    a = 1\n    b = 2\n    c = 3\n    return a * b * c\n"


def test_ambiguous_edit_is_refused_and_nothing_is_written(tmp_path):
    text = "def f():\n    return 1\n\n\ndef g():\n    return 1\n"
    (tmp_path / "m.py").write_text(text)
    (tmp_path / "other.py").write_text("x = 1\n")
    answer = search_replace("other.py", ["x = 1"], ["x = 2"]) + search_replace(
        "m.py", ["    return 1"], ["    return 2"]
    )
    with pytest.raises(PatchError, match=r"block 2 \(m.py\).*matches 2 places.*lines 2, 6"):
        apply(answer, tmp_path)
    assert (tmp_path / "m.py").read_text() == text and (tmp_path / "other.py").read_text() == "x = 1\n"


def test_wrong_edits_are_refused_with_the_closest_lines(tmp_path):
    failures = 0
    for n, case in enumerate(CORPUS[:40]):
        root = tmp_path / f"{n}"
        root.mkdir()
        original = "\n".join(case["before"]) + "\n"
        (root / case["path"]).write_text(original)
        wrong = [case["old"][0] + " # not in the file"] + case["old"][1:]
        with pytest.raises(PatchError, match=r"not in the file.*closest lines"):
            apply(search_replace(case["path"], wrong, case["new"]), root, lint=False)
        failures += (root / case["path"]).read_text() != original
    assert failures == 0


def test_lint_gate_refuses_broken_python_and_keeps_the_tree(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    return 1\n")
    with pytest.raises(PatchError, match="syntax error at line 1"):
        apply(search_replace("m.py", ["def f():"], ["def f(:"]), tmp_path)
    assert (tmp_path / "m.py").read_text() == "def f():\n    return 1\n"


def test_lint_gate_uses_tree_sitter_for_other_languages(tmp_path):
    (tmp_path / "m.go").write_text("package main\n\nfunc f() int {\n\treturn 1\n}\n")
    with pytest.raises(PatchError, match="does not parse as go"):
        apply(search_replace("m.go", ["\treturn 1"], ["\treturn 1 +"]), tmp_path)


def test_new_deleted_and_renamed_files_from_a_git_diff(tmp_path):
    (tmp_path / "old.py").write_text("x = 1\n")
    (tmp_path / "gone.py").write_text("y = 2\n")
    diff = (
        "diff --git a/new.py b/new.py\nnew file mode 100644\n--- /dev/null\n+++ b/new.py\n@@ -0,0 +1,2 @@\n"
        "+def hello():\n+    return 'hi'\n"
        "diff --git a/gone.py b/gone.py\ndeleted file mode 100644\n--- a/gone.py\n+++ /dev/null\n"
        "@@ -1 +0,0 @@\n-y = 2\n"
        "diff --git a/old.py b/renamed.py\nsimilarity index 100%\nrename from old.py\nrename to renamed.py\n"
    )
    result = apply(diff, tmp_path)
    assert sorted(result.applied) == [1, 2, 3]
    assert (tmp_path / "new.py").read_text() == "def hello():\n    return 'hi'\n"
    assert not (tmp_path / "gone.py").exists() and not (tmp_path / "old.py").exists()
    assert (tmp_path / "renamed.py").read_text() == "x = 1\n"


def test_crlf_files_keep_their_line_endings(tmp_path):
    (tmp_path / "w.py").write_bytes(b"a = 1\r\nb = 2\r\n")
    apply(search_replace("w.py", ["b = 2"], ["b = 3"]), tmp_path)
    assert (tmp_path / "w.py").read_bytes() == b"a = 1\r\nb = 3\r\n"


def test_no_edits_and_unclosed_blocks_give_feedback():
    with pytest.raises(PatchError, match="no edits found"):
        parse("I think the bug is in the parser.")
    with pytest.raises(PatchError, match="not closed"):
        parse("m.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n")


def test_apply_cli_is_all_or_nothing(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    return 1\n")
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(search_replace("m.py", ["    return 1"], ["    return 2"]))
    bad.write_text(search_replace("m.py", ["    return 7"], ["    return 2"]))
    exe = Path(sys.executable).parent / "ds4-agent"
    checked = subprocess.run(
        [exe, "apply", str(good), "--repo", str(tmp_path), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0 and (tmp_path / "m.py").read_text().endswith("return 1\n")
    refused = subprocess.run(
        [exe, "apply", str(bad), "--repo", str(tmp_path)], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "not in the file" in refused.stdout + refused.stderr
    applied = subprocess.run(
        [exe, "apply", str(good), "--repo", str(tmp_path)], capture_output=True, text=True
    )
    assert applied.returncode == 0 and (tmp_path / "m.py").read_text().endswith("return 2\n")
