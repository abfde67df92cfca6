"""ds4's DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on random tiny checkpoints: logits at every
position across many windows, step-by-step decode, chunked prefill and greedy generation."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from tests.conftest import (
    assert_same_snapshots,
    block_snapshots,
    chunked_logits,
    greedy_reference,
    max_rel_err,
    oracle_case,
    stable_indexer_topk,
    stepwise_logits,
)

SEQ_LEN = 160  # with window 8 and ratios 4 / 8: 20 sliding windows, 40 CSA rows, 20 HCA rows
ALL_KINDS = [
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
]
CASES = {
    # every attention kind, hash + learned routing, 2 streams, index_topk 4 of up to 40 rows
    "mixed-hc2": dict(),
    # 4 streams, ratio-2 CSA with top-3, a wider window, one hash layer, sigmoid-free default rope on "main"
    "hc4-csa2": dict(
        hc_mult=4,
        sliding_window=12,
        index_topk=3,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 16},
    ),
    # heavily compressed layers first (V4-Pro's schedule), plain rope on the compressed branch too
    "hca-first": dict(
        layer_types=[
            "heavily_compressed_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "sliding_attention",
        ],
        rope_parameters=None,
        num_experts_per_tok=3,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return oracle_case(folder, "deepseek_v4", CASES[request.param], seed=3, seq_len=SEQ_LEN, ids_seed=11)


def test_score_matches_transformers_at_every_position(case):
    path, _, ids, ref = case
    got = LLM(path).score(ids.tolist())
    assert got.shape == ref.shape
    assert max_rel_err(got, ref) < 1e-4


def test_step_by_step_decode_equals_full_scoring(case):
    path, _, ids, _ = case
    llm = LLM(path)
    full = llm.score(ids.tolist())
    assert max_rel_err(stepwise_logits(llm, ids, prefix=3), full) < 1e-5


@pytest.mark.parametrize("chunk", [5, 16, 37])  # chunks that straddle windows and compression blocks
def test_chunked_prefill_equals_full_scoring(case, chunk):
    path, _, ids, _ = case
    llm = LLM(path)
    full = llm.score(ids.tolist())
    assert max_rel_err(chunked_logits(llm, ids, chunk), full) < 1e-5


def test_greedy_generate_matches_transformers(case):
    path, hf, ids, _ = case
    prompt = ids[:21]
    out = LLM(path).generate(prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=40))
    assert out[0].token_ids == greedy_reference(hf, prompt, 40)


def test_batched_generation_equals_one_at_a_time(case):
    path, _, ids, _ = case
    llm = LLM(path)
    prompts = [ids[:9].tolist(), ids[30:47].tolist(), ids[60:61].tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == [llm.generate(p, params)[0].token_ids for p in prompts]


def test_a_batch_with_a_prefix_hit_decodes_each_prompt_as_alone(case):
    """Batched decode over the pooled state: one prompt resumes from cached blocks (32 tokens, a multiple
    of every ratio here), the others are shorter, decode crosses block boundaries (snapshots taken from
    the pools mid-decode); each gets the tokens it gets alone without a cache."""
    path, _, ids, _ = case
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    shared = ids[:100].tolist()
    prompts = [shared + ids[150:153].tolist(), ids[100:105].tolist(), ids[110:147].tolist()]
    cold = LLM(path, enable_prefix_caching=False)
    alone = [cold.generate(p, params)[0].token_ids for p in prompts]
    llm = LLM(path, block_size=32)
    llm.generate(shared + [5], params)
    outs = llm.generate(prompts, params)
    assert outs[0].num_cached_tokens == 96
    assert [o.token_ids for o in outs] == alone


@pytest.mark.parametrize("chunk", [37, 160])  # chunks ending inside blocks; one chunk over every block
def test_a_chunk_over_many_blocks_snapshots_each_as_one_block_chunks_do(case, chunk):
    """A prefill chunk keeps the state at each block end it passes (window tail, compressors' overlap),
    so its blocks' snapshots equal those of a prefill in chunks of one block, which end where the blocks
    do and snapshot the live state."""
    path, _, ids, _ = case
    prompt = ids[:150].tolist()
    want = block_snapshots(path, prompt, 32, 32)
    assert_same_snapshots(block_snapshots(path, prompt, 32, chunk), want)


def test_ds4_written_v4_checkpoint_loads_in_transformers(tmp_path):
    """`model init --family deepseek_v4` writes DeepSeek's reference names; transformers reads them."""
    from transformers import AutoModelForCausalLM

    from ds4.engine.random_checkpoint import init_checkpoint

    path = init_checkpoint("deepseek_v4", "tiny", tmp_path / "v4", seed=2)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(2, 512, (90,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), stable_indexer_topk():
        ref = hf(ids[None]).logits[0]
    assert max_rel_err(LLM(path).score(ids.tolist()), ref) < 1e-4


def test_compressed_rows_live_in_the_cache_blocks_allocated_once(tiny_v4):
    """V4's compressed rows are paged in the engine's cache blocks: the pools are sized by the block count
    (allocated for every slot at the longest context, V4-Flash's were 219 GiB at 16 sequences of 1M),
    every tensor of the cache is allocated once (a decode graph replays over fixed addresses), and a
    prefix hit reads its cached blocks' rows where they are: each prompt gets the tokens it gets alone."""
    llm = LLM(tiny_v4, block_size=32, num_cache_blocks=24, max_num_seqs=4)
    cache = llm.engine.cache
    for pool in cache.compressors.values():
        assert pool.entries.shape[0] == (24 + 1) * (32 // pool.ratio)  # the blocks and a scratch block
    tensors = [*cache.windows, *(t for pool in cache.compressors.values() for t in pool.tensors())]
    tensors += [t for pool in cache.engram.values() for t in (pool.ids, pool.values)]
    addresses = [t.data_ptr() for t in tensors]

    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 200, (70,), generator=gen).tolist()
    prompts = [shared + [9, 10], torch.randint(2, 200, (45,), generator=gen).tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    cold = LLM(tiny_v4, enable_prefix_caching=False)
    alone = [cold.generate(p, params)[0].token_ids for p in prompts]

    llm.generate(shared + [7], params)
    by_tokens = {b.token_ids: i for i, b in enumerate(llm.engine.blocks.blocks) if b.token_ids}
    hit = [by_tokens[tuple(shared[:32])], by_tokens[tuple(shared[32:64])]]
    rows = [{k: v.clone() for k, v in cache.block_tensors(b).items() if "_rows." in k} for b in hit]
    outs = llm.generate(prompts, params)  # two blocks over: decode's entries cross into new blocks
    assert outs[0].num_cached_tokens == 64
    assert [o.token_ids for o in outs] == alone
    for block, kept in zip(hit, rows, strict=True):  # the shared blocks' rows, untouched by the hit
        for name, tensor in cache.block_tensors(block).items():
            if name in kept:
                assert torch.equal(tensor, kept[name]), name
    assert [t.data_ptr() for t in tensors] == addresses


def test_the_attentions_compressed_rows_kept_in_the_models_dtype_change_no_result(tiny_v4):
    """In bfloat16 the attention's compressed rows are stored cast, as the attention reads them (the
    indexer's stay float32): the same logits as an engine whose pools hold them in float32."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    prompts = [list(range(3, 70)), list(range(80, 91))]
    runs = []
    for wide in (False, True):
        llm = LLM(tiny_v4, dtype="bfloat16", block_size=32)
        pools = llm.engine.cache.compressors
        assert {name: p.entries.dtype for (_, name), p in pools.items()} == {
            "attn": torch.bfloat16,
            "index": torch.float32,
        }
        if wide:
            for (_, name), pool in pools.items():
                if name == "attn":
                    pool.entries = pool.entries.float()
        runs.append(llm.generate(prompts, params))
    for narrow, wide in zip(*runs, strict=True):
        assert narrow.token_ids == wide.token_ids
        assert [e["logprob"] for e in narrow.logprobs] == [e["logprob"] for e in wide.logprobs]
