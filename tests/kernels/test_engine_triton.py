"""The engine's oracle tests with the Triton path forced on (Triton's interpreter on the CPU): the
absorbed MLA attention runs in ds4's kernels (the flash-style prefill for V3, attention over the indexer's
chosen rows for V3.2), and logits still match transformers at every position; step-by-step decode
over the paged cache still equals full scoring. On a CUDA machine the engine runs on the card: the kernels
compiled for real, fp32 dots in IEEE precision."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM
from ds4.engine.context import SeqSlice
from ds4.kernels import forced
from tests.conftest import max_rel_err, oracle_case, save_hf_checkpoint, stable_indexer_topk
from tests.engine.test_deepseek_v3 import CASES
from tests.kernels.conftest import DEVICE

SEQ_LEN = 40
PICKED = ["v3-groups-yarn", "v32-yarn-dense2"]


@pytest.fixture(scope="module", params=PICKED)
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path, _, ids, ref = oracle_case(
        tmp_path_factory.mktemp(request.param), family, overrides, seed=3, seq_len=SEQ_LEN, ids_seed=11
    )
    return path, ids, ref


def test_score_matches_transformers_with_the_triton_path(case, monkeypatch):
    import ds4.kernels.indexer as indexer
    import ds4.kernels.mla_decode as mla_decode
    import ds4.kernels.mla_prefill as mla_prefill
    import ds4.kernels.moe as moe
    import ds4.kernels.rmsnorm as rmsnorm
    import ds4.kernels.small_ops as small_ops
    import ds4.kernels.sparse_attention as sparse_attention

    calls = []
    spied = [
        (mla_decode, "paged_mla_decode"),
        (mla_prefill, "mla_prefill"),
        (sparse_attention, "sparse_attention"),
        (moe, "fused_moe"),
        (rmsnorm, "rmsnorm"),
        (indexer, "indexer_topk"),
        (small_ops, "rope"),
    ]
    for module, name in spied:
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw)
        )
    path, ids, ref = case
    with forced(True):
        got = LLM(path, device=DEVICE, mla_mode="absorbed").score(ids.tolist()).cpu()
    assert max_rel_err(got, ref) < 1e-4
    attention = {"paged_mla_decode", "mla_prefill", "sparse_attention"} & set(calls)
    assert len(attention) == 1  # every layer's attention ran in one kernel: the prefill one or the sparse one
    assert {"fused_moe", "rmsnorm", "rope"} <= set(calls)
    assert ("indexer_topk" in calls) == ("sparse_attention" in calls)  # V3.2 selects through the kernel too


def test_step_by_step_decode_with_the_triton_path_equals_full_scoring(case, monkeypatch):
    """The cache's table holds 4x the sequence, so V3's decode launches split its positions (at most 64
    each, as kv_splits does on the CPU) and merge the splits: the merge is on the oracle's path too."""
    import ds4.kernels.mla_decode as mla_decode

    merges = []
    combine = mla_decode.combine_splits
    monkeypatch.setattr(mla_decode, "combine_splits", lambda *a, **kw: merges.append(1) or combine(*a, **kw))
    path, ids, ref = case
    llm = LLM(path, device=DEVICE, mla_mode="absorbed")
    cache, prefix = llm.runner.new_cache(1, 4 * SEQ_LEN), 9
    with forced(True):
        rows = [llm.runner.step(ids[:prefix].tolist(), [SeqSlice(0, 0, prefix, 0)], cache, all_logits=True)]
        for pos in range(prefix, SEQ_LEN):
            rows.append(llm.runner.step([int(ids[pos])], [SeqSlice(0, pos, 1, 0)], cache))
    assert max_rel_err(torch.cat(rows).cpu(), ref) < 1e-4
    if not llm.config.index_topk and DEVICE == "cpu":  # V3's paged decode (V3.2 attends to its top-k)
        assert merges


def test_the_switch_is_off_on_the_cpu_unless_forced():
    from ds4.kernels import triton_enabled

    assert not triton_enabled(torch.device("cpu"))
    with forced(True):
        assert triton_enabled(torch.device("cpu"))
    assert not triton_enabled(torch.device("cpu"))


def test_v4_score_matches_transformers_with_the_triton_path(tmp_path, monkeypatch):
    """V4 (4 streams, clamped SwiGLU experts): attention over the window and the chosen compressed rows
    with the sink, mHC mixing and the MoE run in ds4's kernels; decode's indexer scores the compressed
    keys where they are paged, through the block table, and its compressors run in one kernel each."""
    import ds4.kernels.compressor as compressor
    import ds4.kernels.indexer as indexer
    import ds4.kernels.moe as moe
    import ds4.kernels.small_ops as small_ops
    import ds4.kernels.sparse_attention as sparse_attention
    from tests.engine.test_deepseek_v4 import CASES as V4_CASES

    calls = []
    spied = [
        (moe, "fused_moe"),
        (small_ops, "mhc_mix"),
        (sparse_attention, "sparse_attention"),
        (indexer, "paged_indexer_scores"),
        (compressor, "compressor_decode"),
    ]
    for module, name in spied:
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw)
        )
    path, hf = save_hf_checkpoint(tmp_path / "v4", "deepseek_v4", seed=3, **V4_CASES["hc4-csa2"])
    ids = torch.randint(2, hf.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), stable_indexer_topk():
        ref = hf(ids[None]).logits[0].float()
    llm = LLM(path, device=DEVICE)
    with forced(True):
        got = llm.score(ids.tolist()).cpu()
        cache, prefix = llm.runner.new_cache(1, SEQ_LEN), 3
        rows = [llm.runner.step(ids[:prefix].tolist(), [SeqSlice(0, 0, prefix, 0)], cache, all_logits=True)]
        for pos in range(prefix, SEQ_LEN):
            rows.append(llm.runner.step([int(ids[pos])], [SeqSlice(0, pos, 1, 0)], cache))
    assert max_rel_err(got, ref) < 1e-4
    assert max_rel_err(torch.cat(rows).cpu(), ref) < 1e-4  # step by step through the window cache too
    assert "paged_indexer_scores" in calls  # decode scores the compressed index keys in their blocks
    assert "compressor_decode" in calls  # and feeds its compressors in one kernel each
