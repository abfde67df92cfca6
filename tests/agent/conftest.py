"""Fixtures several agent test modules share: the buggy repository, the served tiny model, a small BPE
tokenizer."""

from __future__ import annotations

import pytest

from tests.fakes import BUGGY, make_repo


@pytest.fixture()
def repo(tmp_path):
    """The BUGGY repository, committed (a module's own `repo` fixture takes precedence there)."""
    return make_repo(tmp_path / "repo", BUGGY)


@pytest.fixture(scope="module")
def served(tiny_v3):
    """The tiny checkpoint behind the served model's engine thread, shut down after the module."""
    from ds4.agent.api.served import ServedModel

    model = ServedModel(str(tiny_v3))
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A 2,048-token BPE tokenizer.json trained by ds4 itself."""
    from ds4.engine.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(2048).save(str(path))
    return path
