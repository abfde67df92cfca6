"""Pipeline parallelism: the layers split over several devices in order, the activations handed across.

On this CPU-only machine the stages are all the CPU ("cpu" listed several times), so the moves cost
nothing and what is checked is the logic: the logits and greedy tokens of one device for every family,
through the paged cache, a prefix-cache hit, hybrid experts and the disk tier; the split (balanced like
the planner's cards, or given); the hand-off counts. The meta device stands in for a second device
where only placement is checked: weights, cache rows and the forward context's per-device view."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.cache import PagedLatentCache
from ds4.engine.config import EngineConfig, ModelConfig
from ds4.engine.context import (
    ForwardContext,
    SeqSlice,
    forward_context,
    get_forward_context,
    switch_forward_context,
)
from ds4.engine.errors import ConfigError
from ds4.engine.hybrid import TieredExperts
from ds4.engine.loader import materialize
from ds4.engine.models import build_model
from ds4.engine.pipeline import Handoff, Pipeline, layer_of
from ds4.engine.planner import split_layers
from ds4.engine.presets import init_preset
from ds4.engine.window_cache import WindowCache
from tests.conftest import ENGRAM_FIELDS
from tests.servers import run_cli

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
PROMPTS = [list(range(5, 40)), list(range(100, 112))]
HIT = PROMPTS[0][:32] + [7, 8, 9]  # two full 16-token blocks of the first prompt, then its own tail
CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.fixture(params=["tiny_v3", "tiny_v32", "tiny_v4"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def run_engine(llm: LLM) -> tuple[list, int]:
    """Both prompts together (batched decode through the paged cache), then one that hits the first's
    cached blocks; returns the outputs and the number of forward passes."""
    outputs, steps = [], 0
    for batch in (PROMPTS, [HIT]):
        ids = [llm.engine.add_request(p, GREEDY) for p in batch]
        while llm.engine.has_unfinished:
            llm.engine.step()
            steps += 1
        outputs += [llm.engine.release(i) for i in ids]
    return outputs, steps


def max_logprob_diff(a, b) -> float:
    steps = [(x, y) for u, v in zip(a, b, strict=True) for x, y in zip(u.logprobs, v.logprobs, strict=True)]
    diffs = [abs(x["logprob"] - y["logprob"]) for x, y in steps]
    diffs += [abs(s[1] - t[1]) for x, y in steps for s, t in zip(x["top"], y["top"], strict=True)]
    return max(diffs)


def activation_bytes(llm: LLM, num_tokens: int) -> int:
    """What one hand-off moves: the hidden states (V4: every mHC stream) of the step's tokens, fp32."""
    config = llm.config
    return num_tokens * config.hidden_size * (config.hc_mult or 1) * 4


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("family", ["tiny_v3", "tiny_v32", "tiny_v4", "tiny_v4_engram"])
def test_a_split_model_gives_the_logits_and_tokens_of_one_device(request, family, stages):
    path = request.getfixturevalue(family)
    single = LLM(path, block_size=16)
    split = LLM(path, block_size=16, devices=("cpu",) * stages)
    ids = list(range(3, 50))
    assert (split.score(ids) - single.score(ids)).abs().max() <= 1e-5
    assert split.runner.handoffs.last_num_handoffs == stages - 1
    assert split.runner.handoffs.last_num_bytes == (stages - 1) * activation_bytes(split, len(ids))

    want, _ = run_engine(single)
    before = split.runner.handoffs.num_handoffs, split.runner.handoffs.num_bytes
    got, steps = run_engine(split)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert max_logprob_diff(got, want) <= 1e-5  # every decode step's logits, through the paged cache
    assert got[-1].num_cached_tokens == want[-1].num_cached_tokens == 32  # the prefix hit
    stats = split.engine.stats()
    computed = stats["tokens_prefilled"] + stats["tokens_decoded"]
    assert split.runner.handoffs.num_handoffs - before[0] == (stages - 1) * steps
    assert split.runner.handoffs.num_bytes - before[1] == (stages - 1) * activation_bytes(split, computed)


def test_hybrid_experts_on_a_split_model_compute_on_their_layers_device(checkpoint):
    single = [o.token_ids for o in LLM(checkpoint).generate(PROMPTS, GREEDY)]
    hybrid = LLM(checkpoint, devices=("cpu", "cpu"), hot_experts=2, hot_period=1)
    assert [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)] == single
    runner = hybrid.runner
    experts = {i: getattr(layer.ffn, "experts", None) for i, layer in enumerate(runner.model.layers)}
    tiered = {i: e for i, e in experts.items() if isinstance(e, TieredExperts)}
    assert len(tiered) == len(runner.tiered) > 0
    assert all(t.compute_device == runner.layer_devices[i] for i, t in tiered.items())
    assert sum(t.stats["promoted"] for t in tiered.values()) > 0
    assert runner.handoffs.num_handoffs > 0


@pytest.mark.parametrize("stages", [2, 3])
def test_the_default_split_is_the_planners_balance_of_the_same_bytes(checkpoint, stages):
    runner = LLM(checkpoint, devices=("cpu",) * stages).runner
    fixed, embed, head = [0] * runner.config.num_hidden_layers, 0, 0
    for name, p in runner.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("layers."):
            fixed[int(name.split(".")[1])] += 0 if ".ffn.experts." in name else nbytes
        elif name.startswith("embed."):
            embed += nbytes
        else:
            head += nbytes
    want = split_layers(fixed, embed, head, stages, every_device=True)
    assert runner.pipeline.layer_stages == [k for k, layers in enumerate(want) for _ in layers]
    assert all(want) and len(set(runner.pipeline.layer_stages)) == stages


def test_a_given_layer_split_places_weights_and_cache_rows_on_its_stages(tiny_v4):
    single = LLM(tiny_v4, block_size=16)
    split = LLM(tiny_v4, block_size=16, devices=("cpu", "cpu"), layer_split=(3, 1))
    runner = split.runner
    assert runner.pipeline.layer_stages == [0, 0, 0, 1] and runner.layer_devices == [CPU] * 4
    for name, p in runner.model.named_parameters():
        layer = layer_of(name)
        want = runner.devices[0] if name.startswith("embed.") else runner.layer_devices[-1]
        assert p.device == (want if layer is None else runner.layer_devices[layer])
    assert split.engine.cache.layer_devices == runner.layer_devices
    assert [o.token_ids for o in run_engine(split)[0]] == [o.token_ids for o in run_engine(single)[0]]
    assert split.runner.handoffs.last_num_handoffs == 1


def test_materialize_puts_each_layer_on_its_own_device():
    """Layer i on layer_devices[i], the embeddings on the first, the final norm and head (V4: the mHC
    head) on the last; on the CPU, dense layers and routed experts row by row for the CPU kernels, other
    matrices input-major, wherever the other layers are."""
    for cfg in (
        init_preset("deepseek_v3", "tiny"),
        dict(init_preset("deepseek_v4", "tiny"), **ENGRAM_FIELDS),
    ):
        config = ModelConfig.from_hf(cfg)
        with torch.device("meta"):
            model = build_model(config)
        layer_devices = [CPU] + [META] * (config.num_hidden_layers - 1)
        materialize(model, config, torch.float32, "cpu", layer_devices)
        for name, p in model.named_parameters():
            layer = layer_of(name)
            want = CPU if name.startswith("embed.") else layer_devices[-1 if layer is None else layer]
            assert p.device == want, name
            if name.endswith("ffn.gate.weight"):
                assert (p.stride()[-2] == 1) == (want == CPU), name  # input-major on the CPU only
            if name.endswith(("wkv_b.weight", "ffn.experts.w13")) and want == CPU:
                assert p.is_contiguous(), name  # read row by row by the CPU kernels
        q_b = [model.get_submodule(f"layers.{i}.attn.wq_b") for i in (0, 1)]
        assert q_b[0].use_cpu_kernel and not q_b[1].use_cpu_kernel  # only where the layer is on the CPU
        assert any(".engram." in n for n, _ in model.named_parameters()) == config.is_v4


def test_caches_keep_each_layers_rows_on_its_device():
    v3 = ModelConfig.from_hf(init_preset("deepseek_v32", "tiny"))
    paged = PagedLatentCache(v3, 4, 16, torch.float32, "cpu", layer_devices=[CPU, META, META])
    assert [t.device for t in paged.kv] == [t.device for t in paged.index_k] == [CPU, META, META]
    rows = paged.prepare(SeqSlice(0, 0, 20, 0, block_ids=(2, 0))).rows
    assert rows.device == CPU and rows.tolist() == list(range(32, 48)) + list(range(4))

    v4 = ModelConfig.from_hf(init_preset("deepseek_v4", "tiny"))
    window = WindowCache(v4, 64, torch.float32, "cpu", 16, layer_devices=[CPU, CPU, META, META])
    assert window.read_window(0, 0, 5).device == CPU and window.read_window(3, 0, 5).device == META
    window.load_block(3, {"window.1": torch.zeros(15, 32), "attn_rows.2": torch.zeros(1, 32)})
    assert {k: t.device for k, t in window.snapshots[3].items()} == {"window.1": CPU}
    assert window.block_tensors(3)["attn_rows.2"].device == META  # compressed rows: in the block's page


def test_the_forward_context_has_one_view_per_device_made_once():
    rows = torch.arange(6)
    ctx = ForwardContext([SeqSlice(0, 2, 4, 0, rows=rows)], torch.arange(2, 6), cache=None, mla_mode="naive")
    view = ctx.on(META)
    assert view.positions.device == META and view.seqs[0].rows.device == META
    assert view.seqs[0].num_tokens == 4 and view.cache is ctx.cache and view.mla_mode == "naive"
    assert ctx.on(META) is view and view.on(CPU) is ctx and ctx.on(CPU) is ctx
    with forward_context(ctx):
        switch_forward_context(META)
        assert get_forward_context() is view
        switch_forward_context(CPU)
        assert get_forward_context() is ctx


def test_a_handoff_moves_the_activations_and_the_inputs_once_per_device():
    pipeline = Pipeline.split([CPU, META, META], [1, 2, 1])  # the last two stages share a device
    rope = (torch.ones(3, 4), torch.zeros(3, 4))
    ctx = ForwardContext([SeqSlice(0, 0, 3, 0, rows=torch.arange(3))], torch.arange(3), None, "naive")
    x, seen, given = torch.ones(3, 8), [], []
    with forward_context(ctx):
        handoff = Handoff(pipeline, CPU, dict(rope=rope, input_ids=torch.arange(3), engram_ids=None))
        for layer in range(4):
            x, inputs = handoff(layer, x)
            seen.append((x.device, inputs["rope"][1].device, get_forward_context().seqs[0].rows.device))
            assert inputs["engram_ids"] is None and inputs["input_ids"].device == x.device
            given.append(inputs)
    assert seen == [(CPU,) * 3] + [(META,) * 3] * 3
    assert given[0]["rope"] is rope and given[1] is given[2] is given[3]  # copied once for the meta device
    assert pipeline.stats.last_num_handoffs == 2 and pipeline.stats.last_num_bytes == 2 * 3 * 8 * 4


def test_disk_tier_blocks_of_a_split_model_load_back(checkpoint, tmp_path):
    kwargs = dict(block_size=16, prefix_cache_dir=str(tmp_path), devices=("cpu", "cpu"))
    first = LLM(checkpoint, **kwargs).generate(PROMPTS[0], GREEDY)[0]
    again = LLM(checkpoint, **kwargs)
    second = again.generate(PROMPTS[0], GREEDY)[0]
    assert again.engine.stats()["tokens_loaded_from_disk"] == 32
    assert second.token_ids == first.token_ids


def test_bad_layer_splits_are_config_errors(tiny_v3):
    for devices, split, message in [
        (("cpu", "cpu"), (1, 1), r"adds up to 2 layers, but the model has 3"),
        (("cpu", "cpu"), (0, 3), "each device needs at least one layer"),
        (("cpu",) * 4, None, "4 devices for a model of 3 layers"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LLM(tiny_v3, devices=devices, layer_split=split)


def test_device_settings_are_checked():
    assert EngineConfig().device == "cpu" and EngineConfig(device="cuda:1").devices is None
    config = EngineConfig(devices=["cuda:1", "cpu"], layer_split=[2, 1])
    assert config.device == "cuda:1" and config.devices == ("cuda:1", "cpu") and config.layer_split == (2, 1)
    with pytest.raises(ValueError, match="must be the first of devices"):
        EngineConfig(device="cpu", devices=("cuda:0", "cuda:1"))
    with pytest.raises(ValueError, match="at least one device"):
        EngineConfig(devices=())
    with pytest.raises(ValueError, match="one layer count per device"):
        EngineConfig(devices=("cpu", "cpu"), layer_split=(3,))
    with pytest.raises(ValueError, match="one layer count per device"):
        EngineConfig(layer_split=(3,))


def test_the_cli_splits_the_layers_over_repeated_devices(tiny_v3):
    want = LLM(tiny_v3).generate("def f(x):", SamplingParams(temperature=0.0, max_tokens=6))[0].text
    flags = ["--device", "cpu", "--device", "cpu", "--max-tokens", "6", "--no-stream"]
    result = run_cli("generate", "--model", tiny_v3, *flags, "--layer-split", "1,2", "def f(x):")
    assert result.returncode == 0, result.stderr
    assert result.stdout == want + "\n"
    result = run_cli("generate", "--model", tiny_v3, *flags, "--layer-split", "2,2", "def f(x):")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ds4-agent: error: layer_split [2, 2] adds up to 4 layers, but the model has 3: "
        "give per-device counts that add up to 3"
    ]


def test_the_cache_budget_holds_for_each_device_of_a_split(tiny_v3):
    """A block's rows of a layer live on that layer's device: split evenly over two cards, each card
    holds half of every block, so the same per-device budget fits twice the blocks."""
    from types import SimpleNamespace

    from ds4.engine.request_engine import LLMEngine

    config = ModelConfig.from_dir(tiny_v3)
    n = config.num_hidden_layers
    row_bytes = (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # float32
    budget_blocks = 40
    settings = EngineConfig(
        block_size=16, max_num_seqs=1000, cache_memory_gb=budget_blocks * 16 * row_bytes * n / (1 << 30)
    )

    def blocks(layer_devices):
        runner = SimpleNamespace(
            config=config, dtype=torch.float32, device=torch.device("cpu"), layer_devices=layer_devices
        )
        return LLMEngine._default_num_blocks(
            SimpleNamespace(config=settings, runner=runner, max_model_len=4096)
        )

    half = n // 2
    two_cards = [torch.device("cuda:0")] * half + [torch.device("cuda:1")] * (n - half)
    assert blocks(None) == budget_blocks
    assert blocks([torch.device("cpu")] * n) == budget_blocks  # stages on one device share its budget
    assert blocks(two_cards) == budget_blocks * n // (n - half)
