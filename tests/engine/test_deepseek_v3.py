"""ds4's DeepSeek V3/V3.2 against the transformers implementations (the oracle) on random tiny checkpoints:
logits at every position, greedy generation, step-by-step decode, absorbed vs naive MLA, bf16."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from tests.conftest import (
    chunked_logits,
    greedy_reference,
    max_rel_err,
    oracle_case,
    stable_indexer_topk,
    stepwise_logits,
)

SEQ_LEN = 72
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

# Several geometries per family: q_lora null, grouped routing, several dense layers, no top-k
# normalization, YaRN, and (V3.2) sequences much longer than index_topk so sparsity matters.
CASES = {
    "v3-no-q-lora": ("deepseek_v3", dict(q_lora_rank=None)),
    "v3-groups-yarn": (
        "deepseek_v3",
        dict(n_group=4, topk_group=2, first_k_dense_replace=2, norm_topk_prob=False, rope_parameters=YARN),
    ),
    "v3-deep-moe": (
        "deepseek_v3",
        dict(
            num_hidden_layers=4,
            first_k_dense_replace=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=2,
            topk_group=1,
            n_shared_experts=2,
        ),
    ),
    "v32-sparse": ("deepseek_v32", dict(n_group=2, topk_group=1)),
    "v32-yarn-dense2": (
        "deepseek_v32",
        dict(
            first_k_dense_replace=2,
            norm_topk_prob=False,
            rope_parameters=YARN,
            index_head_dim=24,
            index_topk=16,
        ),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return oracle_case(folder, family, overrides, seed=len(request.param), seq_len=SEQ_LEN, ids_seed=7)


@pytest.mark.parametrize("mla_mode", ["naive", "absorbed"])
def test_score_matches_transformers_at_every_position(case, mla_mode):
    path, _, ids, ref = case
    got = LLM(path, mla_mode=mla_mode).score(ids.tolist())
    assert got.shape == ref.shape
    assert max_rel_err(got, ref) < 1e-4


def test_absorbed_and_naive_mla_agree(case):
    path, _, ids, _ = case
    naive = LLM(path, mla_mode="naive").score(ids.tolist())
    absorbed = LLM(path, mla_mode="absorbed").score(ids.tolist())
    assert max_rel_err(absorbed, naive) < 1e-5


def test_greedy_generate_matches_transformers(case):
    path, hf, ids, _ = case
    prompt = ids[:12]
    out = LLM(path).generate(prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=24))
    assert out[0].token_ids == greedy_reference(hf, prompt, 24)


def test_step_by_step_decode_equals_full_scoring(case):
    path, _, ids, _ = case
    llm = LLM(path)
    full = llm.score(ids.tolist())
    assert max_rel_err(stepwise_logits(llm, ids, prefix=5), full) < 1e-5


def test_chunked_prefill_equals_full_scoring(case):
    path, _, ids, _ = case
    llm = LLM(path)
    full = llm.score(ids.tolist())
    assert max_rel_err(chunked_logits(llm, ids, 20), full) < 1e-5


def test_bfloat16_is_as_accurate_as_transformers_bfloat16(case):
    # bf16 rounding flips some discrete choices (MoE routing, V3.2's top-k) at a few positions, in
    # transformers too, so the yardstick is transformers' own bf16 error against the fp32 logits.
    path, hf, ids, ref = case
    hf_bf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad(), stable_indexer_topk():
        ref_bf16 = hf_bf16(ids[None]).logits[0].float()
    got = LLM(path, dtype="bfloat16").score(ids.tolist())
    assert got.dtype == torch.float32
    ours = (got - ref).abs().amax(-1) / ref.abs().amax(-1)  # per position, against fp32
    theirs = (ref_bf16 - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert float(ours.median()) < 2 * float(theirs.median())
    # a flipped choice moves a position's logits by >10%; those must stay about as rare as transformers'
    assert int((ours > 0.1).sum()) <= 2 * int((theirs > 0.1).sum()) + 3


def test_ds4_written_checkpoint_loads_in_transformers(tiny_v32):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_v32, attn_implementation="eager").eval()
    ids = torch.randint(2, 512, (SEQ_LEN,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), stable_indexer_topk():
        ref = hf(ids[None]).logits[0]
    assert max_rel_err(LLM(tiny_v32).score(ids.tolist()), ref) < 1e-4
