"""Long prefills at bounded memory: past a workspace of [queries x keys x heads] scores, MLA prefill runs
over the cached context in key blocks with an online softmax (V3.2's selection through the streaming
top-k; V4 attends in query blocks and streams its compressed indexer), and still matches transformers at
every position, whole or chunked over a prefix, torch path and Triton path."""

from __future__ import annotations

import pytest
import torch

import ds4.engine.layers.mla as mla
from ds4.engine import LLM
from ds4.engine.context import SeqSlice
from ds4.kernels import forced
from tests.conftest import chunked_logits, max_rel_err, oracle_case, save_hf_checkpoint, stable_indexer_topk
from tests.engine.test_deepseek_v3 import CASES

SEQ_LEN = 72


@pytest.fixture(scope="module", params=["v3-groups-yarn", "v32-yarn-dense2", "v32-sparse"])
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path, _, ids, ref = oracle_case(
        tmp_path_factory.mktemp(request.param), family, overrides, seed=5, seq_len=SEQ_LEN, ids_seed=3
    )
    return path, ids, ref


@pytest.fixture()
def small_workspace(monkeypatch):
    """Every prefill past 64 score elements runs in key blocks (of 64 keys, the least)."""
    monkeypatch.setattr(mla, "WORKSPACE", 64)


@pytest.mark.parametrize("triton", [False, True])
def test_blocked_prefill_matches_transformers_whole_and_chunked(case, small_workspace, triton, monkeypatch):
    """Triton: the flash-style prefill kernel over the cached latent rows (V3.2 past its top-k: attention
    over the chosen rows) instead of key blocks on torch."""
    import ds4.kernels.mla_prefill as mla_prefill
    import ds4.kernels.sparse_attention as sparse_attention

    calls = []
    for module, name in [(mla_prefill, "mla_prefill"), (sparse_attention, "sparse_attention")]:
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw)
        )
    monkeypatch.setattr(mla.MLA, "_prefill_blocked", _spied(mla.MLA._prefill_blocked, calls))
    path, ids, ref = case
    _matches_whole_and_chunked(LLM(path), ids, ref, triton)
    assert calls and set(calls) <= ({"mla_prefill", "sparse_attention"} if triton else {"_prefill_blocked"})


def test_v32_selection_streams_while_attention_runs_whole(tmp_path, monkeypatch):
    """The indexer streams its top-k past its own workspace (STREAMING), whether or not the attention runs
    in key blocks; the attention then takes the picks as a mask, and the logits stay the oracle's."""
    import ds4.engine.layers.indexer as indexer

    family, overrides = CASES["v32-sparse"]
    path, _, ids, ref = oracle_case(tmp_path, family, overrides, seed=5, seq_len=SEQ_LEN, ids_seed=3)
    monkeypatch.setattr(indexer, "STREAMING", 64)
    calls = []
    monkeypatch.setattr(indexer.Indexer, "select_streaming", _spied(indexer.Indexer.select_streaming, calls))
    monkeypatch.setattr(mla.MLA, "_prefill_blocked", _spied(mla.MLA._prefill_blocked, calls))
    _matches_whole_and_chunked(LLM(path), ids, ref, triton=False)
    assert set(calls) == {"select_streaming"}  # the attention whole: no key blocks


def _matches_whole_and_chunked(llm, ids, ref, triton: bool):
    """The prompt's logits, scored whole and in chunks of 17 over the growing prefix, are the oracle's."""
    with forced(triton):
        whole = llm.score(ids.tolist())
        chunked = chunked_logits(llm, ids, 17)
    assert max_rel_err(whole, ref) < 1e-5
    assert max_rel_err(chunked, ref) < 1e-5


def _spied(method, calls):
    return lambda *a, **kw: calls.append(method.__name__) or method(*a, **kw)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("name", ["mixed-hc2", "hc4-csa2"])
def test_v4_in_query_blocks_and_streamed_selection_matches_transformers(name, triton, tmp_path, monkeypatch):
    """Torch: queries in blocks over the keys they see. Triton: each query's key list, built from the
    layout, in the sparse attention kernel."""
    import ds4.engine.layers.compressed_attention as compressed
    import ds4.engine.layers.indexer as indexer
    from tests.engine.test_deepseek_v4 import CASES as V4_CASES

    monkeypatch.setattr(compressed, "WORKSPACE", 64)  # a few queries per block
    monkeypatch.setattr(indexer, "STREAMING", 64)  # the compressed indexer streams its top-k
    path, hf = save_hf_checkpoint(tmp_path / name, "deepseek_v4", seed=3, **V4_CASES[name])
    ids = torch.randint(2, hf.config.vocab_size, (48,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), stable_indexer_topk():
        ref = hf(ids[None]).logits[0].float()
    llm = LLM(path)
    cache = llm.runner.new_cache(1, 48)
    with forced(triton):
        chunks = [
            llm.runner.step(ids[a : a + 16].tolist(), [SeqSlice(0, a, 16, 0)], cache, all_logits=True)
            for a in range(0, 48, 16)
        ]
        whole = llm.score(ids.tolist())
    assert max_rel_err(whole, ref) < 1e-4
    assert max_rel_err(torch.cat(chunks), ref) < 1e-4


def test_bench_long_reports_each_length_next_to_transformers(tiny_v3):
    from ds4.engine.bench.long import bench_long

    report = bench_long(str(tiny_v3), [300, 600], chunk=128, decode_tokens=4)
    assert list(report["lengths"]) == ["300", "600"]
    for row in report["lengths"].values():
        ds4, peer = row["ds4"], row["transformers"]
        assert ds4["prefill_tokens_per_s"] > 0 and ds4["decode_tokens_per_s"] > 0 and ds4["peak_gb"] >= 0
        assert ds4["ttft_cached_s"] > 0
        assert 0 < ds4["workspace_gb"] <= ds4["planned_workspace_gb"]
        assert peer["prefill_tokens_per_s"] > 0


def test_the_cpu_peak_of_each_length_is_its_own():
    """A later, smaller run's peak is measured from its own start, not hidden under an earlier one's.
    The memory is anonymous mmap pages written once and unmapped: fresh pages whatever malloc keeps."""
    import mmap

    from ds4.engine.bench.long import _Peak

    page = b"\1" * (1 << 20)
    sizes = []
    for n in (128 << 20, 48 << 20):
        with _Peak(torch.device("cpu")) as peak:
            with mmap.mmap(-1, n) as m:
                for offset in range(0, n, len(page)):
                    m[offset : offset + len(page)] = page
        sizes.append(peak.bytes)
    assert sizes[0] >= 120 << 20 and 45 << 20 <= sizes[1] < 100 << 20, sizes


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32", "deepseek_v4"])
def test_a_chunks_workspace_does_not_grow_with_the_context(family, tmp_path, monkeypatch):
    """The activation workspace of a chunk (ds4.engine.activations: bytes of the tensors a step creates,
    alive at once, less what it keeps) at 4x the context is at most 1.5x. Scaled down 8x from 2K chunks
    over 8K and 32K tokens (the workspaces with them), so it runs in seconds; docs/perf.md has the full
    size."""
    import ds4.engine.layers.compressed_attention as compressed
    import ds4.engine.layers.indexer as indexer
    from ds4.engine.activations import ActivationPeak
    from ds4.engine.random_checkpoint import init_checkpoint

    scale = 8 * 8  # [queries x keys] workspaces shrink with the square of the lengths
    monkeypatch.setattr(mla, "WORKSPACE", mla.WORKSPACE // scale)
    monkeypatch.setattr(compressed, "WORKSPACE", compressed.WORKSPACE // scale)
    monkeypatch.setattr(indexer, "STREAMING", indexer.STREAMING // scale)
    path = init_checkpoint(family, "tiny", tmp_path / family, seed=0)
    llm = LLM(path)
    chunk = 256

    def workspace(n: int) -> int:
        cache = llm.runner.new_cache(1, n)
        ids = torch.randint(2, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        worst = 0
        for a in range(0, n, chunk):
            with ActivationPeak() as act:
                llm.runner.step(ids[a : a + chunk].tolist(), [SeqSlice(0, a, chunk, 0)], cache)
            worst = max(worst, act.workspace)
        return worst

    short, long = workspace(1024), workspace(4096)
    assert 0 < long <= 1.5 * short, (short, long)


def test_the_activation_count_sees_what_is_alive_at_once():
    from ds4.engine.activations import ActivationPeak

    kept = torch.zeros(4)
    with ActivationPeak() as act:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more: 8,000 alive
        del a
        c = b[:10].clone()  # 40 bytes: b and c alive
        kept.add_(1)  # in place on a tensor from before: not counted
        del b
        d = torch.empty(250)  # 1,000 bytes
    assert act.peak == 8_000
    assert act.kept == c.nbytes + d.nbytes == 1_040
    assert act.workspace == 6_960
