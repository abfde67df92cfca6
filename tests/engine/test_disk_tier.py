"""The prefix cache's disk tier: a new process reuses a prefix an earlier one computed, with identical
tokens; corrupt, truncated and foreign files are ignored with a warning and never used."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ds4.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def prompt(vocab: int, tail: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, vocab, (600,), generator=gen).tolist()
    return shared + list(range(2, 2 + tail))


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_v32", "tiny_v4"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture()
def warm_dir(checkpoint, tmp_path):
    """A disk tier written by one engine: the two full 256-token blocks of a 600-token prefix."""
    llm = LLM(checkpoint, prefix_cache_dir=tmp_path / "tier")
    llm.generate(prompt(llm.config.vocab_size, 3), GREEDY)
    files = sorted((tmp_path / "tier").rglob("*.safetensors"))
    assert len(files) == 2
    return tmp_path / "tier", files


def reference(checkpoint, tokens):
    return LLM(checkpoint, enable_prefix_caching=False).generate(tokens, GREEDY)[0].token_ids


def test_a_new_process_reuses_the_prefix_from_disk(checkpoint, warm_dir):
    tier, _ = warm_dir
    script = textwrap.dedent(f"""
        import json, torch
        from ds4.engine import LLM, SamplingParams
        llm = LLM({str(checkpoint)!r}, prefix_cache_dir={str(tier)!r})
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(2, llm.config.vocab_size, (600,), generator=gen).tolist() + list(range(2, 9))
        out = llm.generate(tokens, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
        print(json.dumps({{"tokens": out.token_ids, "stats": llm.stats()}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    tokens = prompt(LLM(checkpoint).config.vocab_size, 7)
    assert result["tokens"] == reference(checkpoint, tokens)
    assert result["stats"]["tokens_loaded_from_disk"] == 512
    assert result["stats"]["tokens_reused"] == 512


def _fresh_run(checkpoint, tier, caplog):
    llm = LLM(checkpoint, prefix_cache_dir=tier)
    tokens = prompt(llm.config.vocab_size, 5)
    with caplog.at_level(logging.WARNING, logger="ds4.engine.disk_tier"):
        out = llm.generate(tokens, GREEDY)[0]
    assert out.token_ids == reference(checkpoint, tokens)
    return llm.stats()


def test_corrupted_file_is_detected_and_ignored(checkpoint, warm_dir, caplog):
    tier, files = warm_dir
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the tensor data
    files[0].write_bytes(bytes(data))
    stats = _fresh_run(checkpoint, tier, caplog)
    assert "corrupt" in caplog.text
    assert stats["tokens_loaded_from_disk"] in (0, 256)  # the intact block alone, if it is the first


def test_truncated_file_is_ignored(checkpoint, warm_dir, caplog):
    tier, files = warm_dir
    for file in files:
        file.write_bytes(file.read_bytes()[:200])
    stats = _fresh_run(checkpoint, tier, caplog)
    assert "unreadable" in caplog.text and stats["tokens_loaded_from_disk"] == 0


def test_foreign_file_is_ignored(checkpoint, warm_dir, tmp_path, caplog):
    from ds4.engine.random_checkpoint import init_checkpoint

    tier, files = warm_dir
    other = init_checkpoint("deepseek_v3", "tiny", tmp_path / "other", seed=5)  # another model's tier
    other_tier = tmp_path / "other-tier"
    llm = LLM(other, prefix_cache_dir=other_tier)
    llm.generate(prompt(llm.config.vocab_size, 3), GREEDY)
    for theirs, ours in zip(sorted(other_tier.rglob("*.safetensors")), files, strict=True):
        shutil.copyfile(theirs, ours)  # planted under our names
    stats = _fresh_run(checkpoint, tier, caplog)
    assert stats["tokens_loaded_from_disk"] == 0 and "ignoring prefix-cache file" in caplog.text


def test_disabled_prefix_caching_writes_nothing(checkpoint, tmp_path):
    llm = LLM(checkpoint, prefix_cache_dir=tmp_path / "tier", enable_prefix_caching=False)
    llm.generate(prompt(llm.config.vocab_size, 3), GREEDY)
    assert not (tmp_path / "tier").exists()
