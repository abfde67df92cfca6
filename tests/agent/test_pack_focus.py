"""Symbol-level packing on a repository with a real bug in a large module: the function the issue names
goes in verbatim at small and large budgets, source ranks above tests and examples, more budget never
shows less of an earlier choice, and a huge repository's listing is capped."""

from __future__ import annotations

import random

import pytest

from ds4.agent.budget import steps as offers
from ds4.agent.index.indexer import index_repo
from ds4.agent.index.store import open_index
from ds4.agent.pack import pack, tree_listing
from ds4.agent.rank import focus, is_secondary, rank
from ds4.agent.tokens import TokenCounter
from ds4.agent.views import covers, from_manifest
from tests.fakes import git

BUGGY = '''def volume_discount(quantity):
    """The discount rate for `quantity` units: 5% from 10, 10% from 50, 15% from 100."""
    rate = 0.0
    for threshold, tier_rate in ((10, 0.05), (50, 0.10), (100, 0.15)):
        if quantity > threshold:  # the bug: the tier starts one unit late
            rate = tier_rate
    return rate
'''
ISSUE = (
    "Volume discounts are not applied at the tier thresholds: volume_discount(50) gives 5% instead of "
    "10%, so 50 pens at $2.00 cost $95.00 instead of $90.00."
)


def filler(i: int) -> str:
    body = "\n".join(f"    value = value * {k + 2} % 97 + {i}  # mix {k}" for k in range(14))
    return f'def helper_{i}(value):\n    """Helper {i} for the order pipeline."""\n{body}\n    return value\n'


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop") / "repo"
    (root / "shop").mkdir(parents=True)
    funcs = [filler(i) for i in range(220)]
    funcs.insert(130, BUGGY)
    (root / "shop" / "core.py").write_text("\n\n".join(funcs))
    (root / "shop" / "order.py").write_text(
        "from shop.core import volume_discount\n\n\ndef total(quantity, price):\n"
        "    return quantity * price * (1 - volume_discount(quantity))\n"
    )
    (root / "tests").mkdir()
    cases = "\n".join(f"def test_discount_{q}():\n    assert volume_discount({q}) >= 0\n" for q in range(120))
    (root / "tests" / "test_core.py").write_text("from shop.core import volume_discount\n\n" + cases)
    for name in ("bulk", "tiers", "coupons"):
        (root / "examples" / name).mkdir(parents=True)
        text = f"# {name}\n" + "Volume discounts at the tier thresholds: 10, 50 and 100 units.\n" * 60
        (root / "examples" / name / "README.md").write_text(text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "shop")
    index_repo(root)
    return root


def packed(repo, budget, tokenizer, issue=ISSUE):
    return pack(open_index(repo / ".ds4" / "index.db"), repo, issue, budget, TokenCounter(tokenizer))


@pytest.mark.parametrize("budget", [8_000, 32_000])
def test_the_named_function_goes_in_verbatim(shop, tokenizer_file, budget):
    result = packed(shop, budget, tokenizer_file)
    files = {f.path: f for f in result.files}
    assert files["shop/core.py"].mode in ("focused", "bodies"), files["shop/core.py"]
    assert BUGGY in result.prompt and result.total_tokens <= budget
    assert any("named: volume_discount" in why for why in files["shop/core.py"].why)
    assert files["shop/order.py"].mode in ("whole", "focused")  # the caller


def test_source_ranks_above_tests_and_examples(shop, tokenizer_file):
    scores = {f.path: f.score for f in packed(shop, 8_000, tokenizer_file).files}
    assert scores["shop/core.py"] > max(scores["tests/test_core.py"], scores["examples/bulk/README.md"])
    about_tests = packed(shop, 8_000, tokenizer_file, ISSUE + " The tests miss it.")
    assert not any("test, doc or example" in why for f in about_tests.files for why in f.why)


def test_more_budget_never_shows_less_of_an_earlier_step(shop, tokenizer_file):
    db = open_index(shop / ".ds4" / "index.db")
    first = packed(shop, 4_000, tokenizer_file)
    order = [f.path for f in first.files]
    scores = rank(db, ISSUE, order)
    secondary = frozenset(p for p in order if is_secondary(p, ISSUE))
    steps = offers(order, scores, focus(db, ISSUE, scores), set(), secondary)
    budgets = sorted(random.Random(7).sample(range(3_000, 70_000), 9))
    shown_at = []
    for budget in budgets:
        files = packed(shop, budget, tokenizer_file).files
        shown_at.append({f.path: from_manifest({"mode": f.mode, "bodies": f.bodies}) for f in files})
    for small, large in zip(shown_at, shown_at[1:], strict=False):
        vector = [(covers(small[p], t), covers(large[p], t)) for p, t in steps]
        first_difference = next((pair for pair in vector if pair[0] != pair[1]), (False, True))
        assert first_difference == (False, True), (budgets, vector)
    assert BUGGY in packed(shop, budgets[0], tokenizer_file).prompt


def test_a_huge_listing_is_capped_and_summarised():
    paths = [f"pkg{i % 50}/sub{i % 7}/mod{i}.py" for i in range(50_000)] + ["README.md"]
    listing = tree_listing(paths, max_lines=400)
    lines = listing.splitlines()
    assert len(lines) <= 402 and "folders summarised" in lines[0] and "  README.md" in lines
    assert "  pkg3/sub1/ (" in listing
    assert tree_listing(["a.py", "b/c.py"]) == "Repository files:\n  a.py\n  b/c.py\n"
