"""Engram (hashed n-gram memory) against a direct implementation of the published design written here:
same outputs, the same outputs token by token with bounded state, and off unless a config enables it."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ds4.engine import LLM
from ds4.engine.config import EngramConfig, ModelConfig
from ds4.engine.layers.engram import Engram, EngramPool, EngramState, layer_multipliers, table_primes
from ds4.engine.presets import init_preset
from tests.conftest import ENGRAM_FIELDS, max_rel_err, stepwise_logits

CFG = EngramConfig(
    layer_ids=(1, 3),
    vocab_sizes=(53, 71),
    max_ngram=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=4,
    kernel_size=4,
    pad_id=2,
    seed=7,
)
HIDDEN, STREAMS, VOCAB = 24, 2, 40


def make_engram(layer_id: int = 3) -> Engram:
    torch.manual_seed(0)
    engram = Engram(CFG, layer_id, HIDDEN, STREAMS, normalized_vocab=VOCAB, pad_id=CFG.pad_id)
    with torch.no_grad():
        for name, p in engram.named_parameters():
            p.copy_(
                torch.randn(p.shape) * (0.3 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0)
            )
    return engram


def published_hashes(ids: np.ndarray, layer_id: int) -> np.ndarray:
    """The published `_get_ngram_hashes`, for one sequence [T] -> [T, orders * heads] table rows."""
    x = ids[None, :].astype(np.int64)
    T = x.shape[1]
    multipliers = layer_multipliers(CFG, layer_id, VOCAB)

    def shift(k):
        return x if k == 0 else np.pad(x, ((0, 0), (k, 0)), constant_values=CFG.pad_id)[:, :T]

    shifts, hashes = [shift(k) for k in range(CFG.max_ngram)], []
    primes = table_primes(CFG)[layer_id]
    for n in range(2, CFG.max_ngram + 1):
        mix = shifts[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
        hashes += [mix % p for p in primes[n - 2]]
    rows = np.stack(hashes, axis=2)[0]
    offsets = np.cumsum([0] + [p for order in primes for p in order][:-1])
    return rows + offsets


def published_forward(engram: Engram, streams: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """The published Engram.forward (batch 1), with torch.nn modules carrying ds4's weights."""
    T, N, D = streams.shape
    emb = engram.multi_head_embedding.embedding(torch.from_numpy(published_hashes(ids, engram.layer_id)))
    embeddings = emb.flatten(start_dim=-2)
    gates = []
    for h in range(N):
        norm1, norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        norm1.weight.data, norm2.weight.data = engram.norm1[h].weight.data, engram.norm2[h].weight.data
        key = norm1(engram.key_projs[h](embeddings))
        query = norm2(streams[:, h])
        gate = (key * query).sum(dim=-1) / math.sqrt(D)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gates.append(gate.sigmoid().unsqueeze(-1))
    value = torch.stack(gates, dim=1) * engram.value_proj(embeddings).unsqueeze(1)  # [T, N, D]
    conv = nn.Conv1d(
        N * D,
        N * D,
        CFG.kernel_size,
        groups=N * D,
        bias=False,
        padding=(CFG.kernel_size - 1) * CFG.max_ngram,
        dilation=CFG.max_ngram,
    )
    conv.weight.data = engram.short_conv.conv.weight.data
    normed = []
    for h in range(N):
        norm = nn.RMSNorm(D, eps=1e-5)
        norm.weight.data = engram.short_conv.norms[h].weight.data
        normed.append(norm(value[:, h]))
    y = conv(torch.cat(normed, dim=-1).T.unsqueeze(0))[..., :T]
    y = nn.SiLU()(y)[0].T.reshape(T, N, D)
    return value + y


def test_primes_are_distinct_primes_above_each_table_size():
    primes = table_primes(CFG)
    flat = [p for layer in CFG.layer_ids for order in primes[layer] for p in order]
    assert len(set(flat)) == len(flat)
    assert all(all(p % d for d in range(2, int(p**0.5) + 1)) for p in flat)
    assert primes[1][0][0] == 53 and primes[1][1][0] == 71  # 53 and 71 are prime themselves


def test_matches_the_published_equations():
    engram = make_engram()
    gen = torch.Generator().manual_seed(1)
    streams = torch.randn(37, STREAMS, HIDDEN, generator=gen)
    ids = torch.randint(0, VOCAB, (37,), generator=gen)
    with torch.no_grad():
        got, _ = engram(streams, ids, ids[:0], streams[:0])
        want = published_forward(engram, streams, ids.numpy())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_by_token_equals_whole_sequence_with_bounded_state():
    engram = make_engram(layer_id=1)
    gen = torch.Generator().manual_seed(2)
    streams = torch.randn(50, STREAMS, HIDDEN, generator=gen)
    ids = torch.randint(0, VOCAB, (50,), generator=gen)
    state, rows = EngramState(), []
    with torch.no_grad():
        whole = engram.step(streams, ids, EngramState())
        for t in range(50):
            rows.append(engram.step(streams[t : t + 1], ids[t : t + 1], state))
            # O(1) per token: a step reads a fixed number of earlier ids and values, whatever t is
            assert state.ids.shape[0] <= CFG.max_ngram - 1
            assert state.values.shape[0] <= engram.context == (CFG.kernel_size - 1) * CFG.max_ngram
    torch.testing.assert_close(torch.cat(rows), whole, rtol=1e-5, atol=1e-6)


def test_batched_decode_equals_each_sequence_step_by_step():
    """Engram.decode over a pool: sequences at different positions (one with fewer earlier tokens than an
    n-gram needs) add a token each, as `step` adds it to each alone, and the pool advances by that token."""
    engram = make_engram(layer_id=1)
    gen = torch.Generator().manual_seed(4)
    lengths, rows = (1, 5, 13), torch.tensor([2, 0, 3])  # tokens before the decoded one; pool rows
    streams = [torch.randn(n + 1, STREAMS, HIDDEN, generator=gen) for n in lengths]
    ids = [torch.randint(0, VOCAB, (n + 1,), generator=gen) for n in lengths]
    pool, want = EngramPool(4, CFG, STREAMS, HIDDEN, torch.float32, "cpu"), []
    with torch.no_grad():
        for row, n, x, t in zip(rows.tolist(), lengths, streams, ids, strict=True):
            pool.reset(row)
            state = pool.load(row)
            engram.step(x[:n], t[:n], state)  # the prompt
            pool.store(row, state)
            want.append(engram.step(x[n:], t[n:], EngramState(state.ids, state.values)))
        got = engram.decode(
            torch.stack([x[-1] for x in streams]), torch.stack([t[-1] for t in ids]), pool, rows
        )
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-6)
    assert pool.ids[rows].tolist() == [t[-(CFG.max_ngram - 1) :].tolist() for t in ids]


def test_off_by_default():
    config = ModelConfig.from_hf(init_preset("deepseek_v4", "tiny"))
    assert config.engram is None
    with torch.device("meta"):
        from ds4.engine.models import build_model

        names = [n for n, _ in build_model(config).named_parameters()]
    assert not any("engram" in n for n in names)


def test_model_with_engram_decodes_like_it_scores(tiny_v4_engram):
    llm = LLM(tiny_v4_engram)
    assert llm.config.engram.layer_ids == (0, 2)
    ids = torch.randint(2, 512, (40,), generator=torch.Generator().manual_seed(3))
    full = llm.score(ids.tolist())
    assert max_rel_err(stepwise_logits(llm, ids, prefix=4), full) < 1e-5


def test_engram_only_adds_to_the_residual(tiny_v4_engram, tmp_path):
    """With its value projection zeroed, an Engram model scores exactly as the model without Engram."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def variant(name, edit_tensors, edit_config):
        path = tmp_path / name
        shutil.copytree(tiny_v4_engram, path)
        tensors = load_file(path / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((path / "config.json").read_text())
        edit_config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    def zero_values(tensors):
        for name in tensors:
            if ".engram.value_proj." in name:
                tensors[name] = torch.zeros_like(tensors[name])

    def drop_engram(tensors):
        for name in [n for n in tensors if ".engram." in n]:
            del tensors[name]

    silent = variant("silent", zero_values, lambda cfg: None)
    without = variant("without", drop_engram, lambda cfg: [cfg.pop(k) for k in ENGRAM_FIELDS])
    ids = list(range(2, 30))
    base = LLM(without).score(ids)
    assert max_rel_err(LLM(silent).score(ids), base) < 1e-6
    assert max_rel_err(LLM(tiny_v4_engram).score(ids), base) > 1e-3


def test_prefix_cache_restores_engram_state(tiny_v4_engram):
    from ds4.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(9)
    shared = torch.randint(2, 512, (300,), generator=gen).tolist()
    prompt = shared + [5, 6, 7]
    cold = LLM(tiny_v4_engram, enable_prefix_caching=False).generate(prompt, params)[0]
    llm = LLM(tiny_v4_engram)
    llm.generate(shared + [9], params)
    warm = llm.generate(prompt, params)[0]
    assert warm.num_cached_tokens == 256 and warm.token_ids == cold.token_ids


def test_a_chunk_over_many_blocks_keeps_the_engram_state_at_each(tiny_v4_engram):
    """Engram's ids and values at each block end inside a chunk are what a chunk ending there leaves."""
    from tests.conftest import assert_same_snapshots, block_snapshots

    prompt = torch.randint(2, 512, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    want = block_snapshots(tiny_v4_engram, prompt, 32, 32)
    assert any(name.startswith("engram_values.") for name in next(iter(want.values())))
    assert_same_snapshots(block_snapshots(tiny_v4_engram, prompt, 32, 150), want)
