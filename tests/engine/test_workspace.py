"""The planned workspace of a prefill step (ds4.engine.workspace, computed from the config) bounds what
the step counts (ds4.engine.activations) and is not wasteful: within 2x, for every family, short and
long contexts, whole and key-blocked attention. An engine whose chunk would not fit refuses to start
with the numbers."""

from __future__ import annotations

import pytest
import torch

import ds4.engine.layers.compressed_attention as compressed
import ds4.engine.layers.indexer as indexer
import ds4.engine.layers.mla as mla
from ds4.engine import LLM
from ds4.engine.activations import ActivationPeak
from ds4.engine.context import SeqSlice
from ds4.engine.errors import ConfigError
from ds4.engine.workspace import check_fits, prefill_workspace


@pytest.mark.parametrize("family", ["tiny_v3", "tiny_v32", "tiny_v4"])
@pytest.mark.parametrize("workspace", [None, 1 << 14, 1 << 18])
def test_the_planned_workspace_bounds_the_counted_one_within_2x(request, family, workspace, monkeypatch):
    """None: whole attention; 1 << 14: the key-blocked / query-blocked / streamed paths at these sizes;
    1 << 18: blocks large enough that their scores outweigh the per-token activations (where a block's
    scores copied four times once went past the plan)."""
    if workspace:
        monkeypatch.setattr(mla, "WORKSPACE", workspace)
        monkeypatch.setattr(compressed, "WORKSPACE", workspace)
        monkeypatch.setattr(indexer, "STREAMING", workspace // 2)
    _check_the_plan(LLM(request.getfixturevalue(family)))


@pytest.mark.parametrize("family", ["tiny_v32", "tiny_v4"])
def test_the_indexer_streams_past_its_own_workspace_while_attention_runs_whole(request, family, monkeypatch):
    """The indexer's [T, heads, S] scores pass its streaming threshold long before the attention's pass
    theirs (at a real V3.2's sizes, at half the keys: 64 index heads against 128). The indexer once
    streamed only when the attention ran in key blocks, so a V3.2 chunk of 512 tokens over 4K keys held
    1.14x its planned workspace (2.1x at 1,024 tokens), and the plan was no bound."""
    monkeypatch.setattr(indexer, "STREAMING", 1 << 12)  # the attention keeps its default: whole here
    _check_the_plan(LLM(request.getfixturevalue(family)))


def _check_the_plan(llm):
    for tokens, context in ((64, 64), (64, 1024), (256, 1024)):
        cache = llm.runner.new_cache(1, context)
        ids = torch.randint(2, llm.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
        start = context - tokens
        if start:
            llm.runner.step(ids[:start].tolist(), [SeqSlice(0, 0, start, 0)], cache)
        with ActivationPeak() as act:
            llm.runner.step(ids[start:].tolist(), [SeqSlice(0, start, tokens, 0)], cache)
        planned = prefill_workspace(llm.config, tokens, context, 4)
        assert act.workspace <= planned <= 2 * act.workspace, (tokens, context, act.workspace, planned)


def test_a_chunk_that_does_not_fit_is_refused_with_what_would(tiny_v3):
    from ds4.engine.config import ModelConfig

    config = ModelConfig.from_dir(tiny_v3)
    need = prefill_workspace(config, 2048, 2048, 4)
    check_fits(config, 2048, 2048, 4, need)  # exactly enough
    with pytest.raises(ConfigError) as refused:
        check_fits(config, 2048, 2048, 4, need // 3)
    message = str(refused.value)
    assert "a prefill chunk of 2048 tokens" in message and "max_num_batched_tokens" in message
    fitting = int(message.split("max_num_batched_tokens ")[1].split()[0])
    assert fitting < 2048 and prefill_workspace(config, fitting, 2048, 4) <= need // 3
