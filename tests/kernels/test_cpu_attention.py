"""MLA's decode attention as C++ operators (kernels/cpu_attention.cpp, `ds4_cpu::paged_latent_attention` and
`ds4_cpu::sparse_latent_attention`): against the torch path's gather-then-softmax (fp32 and bf16 pools,
vector widths and odd ones, skipped rows, empty sequences, long ones in many chunks), the same bits at any
thread count, clear errors for rows outside the pool, the engine's tokens the same with the operators as
without them, and the narrower builds (AVX2, no intrinsics) right too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.kernels import cpu_ops

pytestmark = pytest.mark.usefixtures("cpu_operators")


def reference(q, pool, rows, scale, latent):
    """The torch path (engine/layers/mla.py `_sparse`) in float32: rows gathered, masked softmax, sum."""
    cached = pool[rows.clamp(min=0)].float()  # [B, k, D]
    scores = torch.bmm(q.float(), cached.transpose(1, 2)) * scale
    probs = scores.masked_fill((rows < 0)[:, None, :], float("-inf")).softmax(-1)
    return torch.bmm(probs, cached[..., :latent])


def paged_rows(block_table, seq_lens, block_size):
    pos = torch.arange(max(int(seq_lens.max()), 1))
    rows = block_table.long()[:, pos // block_size] * block_size + pos % block_size
    return torch.where(pos[None] < seq_lens[:, None].long(), rows, -1)


# (sequences, heads, latent, rope, keys, pool rows): the `small` presets' widths, a real model's heads and
# widths, and widths that are not whole vectors (the plain loops)
SHAPES = [
    (4, 8, 128, 32, 96, 600),
    (2, 16, 512, 64, 300, 900),
    (3, 5, 20, 6, 70, 200),
    (1, 4, 32, 16, 5000, 5200),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_matches_the_torch_path(dtype, shape):
    B, H, C, R, K, N = shape
    gen = torch.Generator().manual_seed(K)
    pool = torch.randn(N, C + R, generator=gen).to(dtype)
    q = torch.randn(B, H, C + R, generator=gen).to(dtype)
    rows = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)])
    rows[:, -3:] = -1  # no row there
    rows[0, 1] = -1
    got = torch.ops.ds4_cpu.sparse_latent_attention(q, pool, rows, 0.11, C)
    assert got.shape == (B, H, C) and got.dtype == torch.float32
    want = reference(q, pool, rows, 0.11, C)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
def test_paged_matches_the_torch_path_and_an_empty_sequence_gets_zeros(shape):
    B, H, C, R, K, N = shape
    block_size = 16
    gen = torch.Generator().manual_seed(N)
    pool = torch.randn(N + 1, C + R, generator=gen)
    q = torch.randn(B + 1, H, C + R, generator=gen)
    seq_lens = torch.cat(
        [torch.randint(1, K + 1, (B,), generator=gen), torch.zeros(1, dtype=torch.long)]
    ).int()
    width = (int(seq_lens.max()) + block_size - 1) // block_size
    table = torch.stack([torch.randperm(N // block_size, generator=gen)[:width] for _ in range(B + 1)]).int()
    got = torch.ops.ds4_cpu.paged_latent_attention(q, pool, table, seq_lens, block_size, 0.07, C)
    want = reference(q[:B], pool, paged_rows(table[:B], seq_lens[:B], block_size), 0.07, C)
    assert (got[:B] - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got[B], torch.zeros(H, C))  # a graph's padding row: length 0


def test_the_bits_do_not_depend_on_the_thread_count():
    B, H, C, R, K, N = SHAPES[3]
    gen = torch.Generator().manual_seed(1)
    pool, q = torch.randn(N, C + R, generator=gen), torch.randn(B, H, C + R, generator=gen)
    rows = torch.randint(-1, N, (B, K), generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.ds4_cpu.sparse_latent_attention(q, pool, rows, 0.1, C))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_rows_outside_the_pool_are_a_clear_error():
    pool, q = torch.randn(10, 48), torch.randn(1, 2, 48)
    with pytest.raises(RuntimeError, match="row 10 outside the pool's 10"):
        torch.ops.ds4_cpu.sparse_latent_attention(q, pool, torch.tensor([[3, 10]]), 0.1, 32)
    with pytest.raises(RuntimeError, match="past its table"):
        torch.ops.ds4_cpu.paged_latent_attention(
            q, pool, torch.tensor([[0]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 4, 0.1, 32
        )
    with pytest.raises(RuntimeError, match="q's width 40 against the pool's 48"):
        torch.ops.ds4_cpu.sparse_latent_attention(torch.randn(1, 2, 40), pool, torch.tensor([[3]]), 0.1, 32)


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32"])
def test_the_engine_decodes_the_same_with_and_without_the_operators(request, monkeypatch, checkpoint):
    """Eager decode steps (batches of different lengths): the operators are called, and with them off
    (the torch path, where they cannot be built) the greedy tokens are the same, logprobs within 1e-5."""
    path = request.getfixturevalue(checkpoint)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    prompts = [list(range(3, 40)), list(range(5, 9)), list(range(2, 80))]
    name = "sparse_latent_attention" if checkpoint == "tiny_v32" else "paged_latent_attention"
    calls = []
    op = getattr(torch.ops.ds4_cpu, name)
    runs = []
    for ready in (True, False):
        llm = LLM(path, dtype="float32", max_num_seqs=4, compile_decode=False)
        monkeypatch.setattr(cpu_ops, "READY", ready)
        monkeypatch.setattr(
            torch.ops.ds4_cpu, name, lambda *a, on=ready: calls.append(on) or op(*a), raising=False
        )
        runs.append(llm.generate(prompts, params))
        monkeypatch.undo()
    assert calls and all(calls)  # called with the operators on, never with them off
    for a, b in zip(*runs, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5


CHECK_BUILD = """
import torch
from ds4.kernels import cpu_moe, cpu_ops
from tests.kernels.test_cpu_attention import reference, SHAPES
from tests.kernels.test_cpu_moe import case
assert cpu_ops.load() is None
assert torch.ops.ds4_cpu.isa() == cpu_moe._library(VARIANT).ds4_moe_isa()  # this variant's vector paths
for B, H, C, R, K, N in SHAPES[:3]:
    gen = torch.Generator().manual_seed(K)
    pool, q = torch.randn(N, C + R, generator=gen), torch.randn(B, H, C + R, generator=gen)
    rows = torch.randint(-1, N, (B, K), generator=gen)
    got = torch.ops.ds4_cpu.sparse_latent_attention(q, pool, rows, 0.1, C)
    want = reference(q, pool, rows, 0.1, C)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (B, H, C)
gen = torch.Generator().manual_seed(0)
for fmt in ("int4", "fp32"):
    x, weights, ids, (w13, s13, w2, s2) = case(gen, fmt, 5, 2, 6, 128, 64)
    want = cpu_moe.moe(x, weights, ids, w13, s13, w2, s2, fmt, None, variant=VARIANT, int8=False)
    got = torch.ops.ds4_cpu.moe(x, weights, ids, w13, s13, w2, s2, cpu_moe.FORMATS[fmt], False, None)
    assert torch.equal(got, want), fmt
w = torch.randn(40, 64, generator=gen)
assert torch.equal(torch.ops.ds4_cpu.linear(x[:3, :64], w), cpu_moe.linear(x[:3, :64], w, variant=VARIANT))
"""


@pytest.mark.parametrize("variant", ["avx2", "generic"])
def test_the_narrower_builds_give_the_same_results(variant):
    """The operators built without AVX-512 (the AVX2 paths most desktop CPUs take) and without intrinsics,
    each in a process of its own (a process holds one build): the attention against the torch path, the
    expert and dense kernels the same bits as the ctypes kernel of the same build."""
    env = {**os.environ, "DS4_CPU_OPS_VARIANT": variant}
    script = f"VARIANT = {variant!r}\n" + CHECK_BUILD
    root = Path(__file__).parents[2]  # where `tests` imports from
    command = [sys.executable, "-c", script]
    run = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
