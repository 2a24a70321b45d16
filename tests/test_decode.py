"""The static decode engine (decode.py) against the reference engine: with keyed sampling both give the same tokens
and behaviour log-probs (fp32, 1e-5) for every architecture the static engine supports, every skip plan, compaction
on and off, shared prefill, greedy decoding, top-p, rows stopping at EOS mid-way and rows reaching max_new_tokens.
Where the static engine cannot run (lockstep decoding, `use_cache=False`, other architectures) it hands over or
refuses as documented."""
import pytest
import torch

from nested_reft_ds.decode import BATCH_BUCKETS, UnsupportedModelError, batch_bucket
from nested_reft_ds.model import load_model_and_tokenizer
from nested_reft_ds.nested import SkipPlan
from nested_reft_ds.rollout import DecodeStats, encode_prompts, generate, mark_lockstep
from nested_reft_ds.sampling import keyed_uniform_table, keyed_uniforms

PROMPTS = ["Question: 1+2?", "Q: 33 + 44 - 5 = ?", "Tom has 7 apples.", "x"]
GROUP = 4
STOPS = list(range(10))  # ten stop tokens of 98: completions end at many different lengths
MAX_NEW = 20


def both_engines(model, ids, mask, plan, **kwargs):
    """(reference rollout, its stats, static rollout, its stats) for the same arguments."""
    stats = DecodeStats(), DecodeStats()
    reference = generate(model, ids, mask, plan, engine="reference", stats=stats[0], **kwargs)
    static = generate(model, ids, mask, plan, engine="static", stats=stats[1], **kwargs)
    assert (stats[0].engine, stats[1].engine) == ("reference", "static")
    return reference, stats[0], static, stats[1]


def assert_same_rollout(reference, static):
    assert torch.equal(static.sequences, reference.sequences)
    assert torch.equal(static.completion_mask, reference.completion_mask)
    torch.testing.assert_close(static.behavior_logprobs, reference.behavior_logprobs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def models(tiny_models):
    loaded = {}
    for arch in ("qwen2", "qwen3", "llama", "mistral"):
        model, tok = load_model_and_tokenizer(tiny_models[arch])
        loaded[arch] = model.eval(), tok
    return loaded


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "mistral"])
@pytest.mark.parametrize("skipped", [(), (2,), (0, 3), (1, 2, 4)])
@pytest.mark.parametrize("mode", ["plain", "compact+shared", "greedy", "top_p+compact"])
def test_static_engine_samples_the_reference_tokens_and_logprobs(models, arch, skipped, mode):
    model, tok = models[arch]
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.2, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                  seed=11, compact_below=0.0)
    kwargs.update({"plain": {}, "compact+shared": dict(compact_below=0.9, group_size=GROUP),
                   "greedy": dict(greedy=True), "top_p+compact": dict(top_p=0.8, compact_below=0.9)}[mode])
    reference, reference_stats, static, static_stats = both_engines(model, ids, mask, SkipPlan(6, skipped), **kwargs)
    assert_same_rollout(reference, static)
    lengths = reference.completion_mask.sum(dim=1)
    if mode != "greedy":  # sampled rows stop at EOS mid-way and some run to max_new_tokens
        assert int(lengths.min()) < MAX_NEW and len(set(lengths.tolist())) >= 3
    assert static_stats.alive_row_steps == reference_stats.alive_row_steps
    if mode == "compact+shared":
        assert static_stats.prefill_rows == reference_stats.prefill_rows == len(PROMPTS)
    if "compact" in mode and static_stats.compactions:
        assert static_stats.row_steps < len(ids) * static_stats.steps


def test_rows_reaching_max_new_tokens_and_a_single_token(models):
    model, tok = models["qwen3"]
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    for max_new in (1, 2, 9):
        kwargs = dict(max_new_tokens=max_new, eos_token_id=-1, pad_token_id=tok.pad_token_id, seed=3)
        reference, _, static, stats = both_engines(model, ids, mask, SkipPlan(6, (3,)), **kwargs)
        assert_same_rollout(reference, static)
        assert static.completion_mask.all() and static.completions.shape[1] == max_new
        assert stats.steps == max_new - 1


def test_a_row_keeps_its_tokens_in_any_batch_and_bucket(models):
    """Padding slots, bucket sizes and compaction are invisible: a subset of the rows, reordered, keyed by their own
    keys, samples what those rows sampled in the full batch (5 rows run in a bucket of 6, 16 in one of 16)."""
    model, tok = models["qwen2"]
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                  seed=5, compact_below=0.9)
    full = generate(model, ids, mask, SkipPlan(6, (2,)), **kwargs)
    order = torch.tensor([9, 2, 5, 0, 14])
    subset = generate(model, ids[order], mask[order], SkipPlan(6, (2,)), row_keys=order, **kwargs)
    width = subset.completions.shape[1]
    assert torch.equal(subset.completions, full.completions[order, :width])
    torch.testing.assert_close(subset.behavior_logprobs, full.behavior_logprobs[order, :width], atol=1e-5, rtol=0)


def test_the_host_reads_a_device_value_once_every_sync_interval(models):
    from nested_reft_ds.decode import SYNC_EVERY

    model, tok = models["qwen2"]
    ids, mask = encode_prompts(tok, PROMPTS * 2, "cpu")
    stats = DecodeStats()
    generate(model, ids, mask, SkipPlan(6), max_new_tokens=33, eos_token_id=-1, pad_token_id=tok.pad_token_id,
             stats=stats)
    assert stats.steps == 32 and stats.host_reads == -(-32 // SYNC_EVERY)
    reference = DecodeStats()
    generate(model, ids, mask, SkipPlan(6), max_new_tokens=33, eos_token_id=-1, pad_token_id=tok.pad_token_id,
             stats=reference, engine="reference", compact_below=0.0)
    assert reference.host_reads == 33  # one per step


def test_keyed_uniform_table_is_keyed_uniforms_bit_for_bit():
    keys = torch.tensor([0, 7, 2**40 + 3, 12])
    table = keyed_uniform_table(9, keys, 17)
    assert table.shape == (4, 17) and table.dtype == torch.float64
    for position in range(17):
        assert torch.equal(table[:, position], keyed_uniforms(9, keys, position))
    with pytest.raises(ValueError, match=">= 0"):
        keyed_uniform_table(9, torch.tensor([-1]), 3)


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 5, 12, 13, 16, 17, 100, 1024, 1025)] == [1, 6, 12, 16, 16, 24, 128, 1024,
                                                                                   2048]
    assert list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        batch_bucket(0)


def test_streamed_lockstep_and_uncached_decoding_run_the_reference_engine(models):
    """A model that decodes with collectives (streamed ZeRO-3 marks it with its lockstep rule) has its parameters
    fetched by per-module hooks, which a functional step over the weights would bypass: generate runs the reference
    engine for it even when asked for the static one, and likewise with an explicit all_ranks_done or no cache."""
    model, tok = models["qwen2"]
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    kwargs = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, engine="static")
    mark_lockstep(model, lambda done: done)
    try:
        stats = DecodeStats()
        generate(model, ids, mask, SkipPlan(6), stats=stats, **kwargs)
        assert stats.engine == "reference"
    finally:
        mark_lockstep(model, None)
    for extra in (dict(all_ranks_done=lambda done: done), dict(use_cache=False)):
        stats = DecodeStats()
        generate(model, ids, mask, SkipPlan(6), stats=stats, **kwargs, **extra)
        assert stats.engine == "reference"
    with pytest.raises(ValueError, match="generation.engine.* expected one of static"):
        generate(model, ids, mask, SkipPlan(6), **dict(kwargs, engine="fast"))


def test_unsupported_models_are_refused_with_the_reference_engine_named(models, monkeypatch):
    model, tok = models["llama"]
    ids, mask = encode_prompts(tok, PROMPTS[:2], "cpu")
    kwargs = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    generate(model, ids, mask, SkipPlan(6), engine="reference", **kwargs)  # the reference engine runs anything
    monkeypatch.setattr(model.config, "model_type", "gpt_neox")
    with pytest.raises(UnsupportedModelError, match="model_type='gpt_neox'.*rollout.engine=reference"):
        generate(model, ids, mask, SkipPlan(6), **kwargs)
    monkeypatch.setattr(model.config, "model_type", "llama")
    monkeypatch.setattr(model.config, "rope_parameters", {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_type='dynamic'"):
        generate(model, ids, mask, SkipPlan(6), **kwargs)
    mistral, _ = models["mistral"]
    monkeypatch.setattr(mistral.config, "sliding_window", 16)
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        generate(mistral, ids, mask, SkipPlan(6), **kwargs)


def test_a_partitioned_parameter_is_refused(models):
    """Outside `engine.skip_aware_gather` a ZeRO-3 parameter is an empty placeholder; reading it would decode
    garbage, so the static engine refuses (the reference engine's forward lets ZeRO-3's hooks fetch it)."""
    import copy

    model, tok = models["qwen2"]
    partitioned = copy.deepcopy(model)
    layer = partitioned.model.layers[3].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.empty(0))
    ids, mask = encode_prompts(tok, PROMPTS[:2], "cpu")
    kwargs = dict(max_new_tokens=4, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj\.weight is partitioned.*skip_aware_gather"):
        generate(partitioned, ids, mask, SkipPlan(6), **kwargs)
    generate(partitioned, ids, mask, SkipPlan(6, (3,)), **kwargs)  # a skipped layer is never read


def test_compiled_step_samples_the_reference_tokens_and_a_new_skip_set_compiles_nothing(models):
    """`static_compiled` compiles its layer step once per batch bucket (and cache-length bucket): the layer's weights
    are inputs of the compiled graph, so every layer and every skip set reuses it. Counted at the backend."""
    model, tok = models["qwen3"]
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.2, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                  seed=11, compact_below=0.0)
    compilations = []
    for skipped in [(2,), (1, 4), (0, 3, 4), ()]:
        plan = SkipPlan(6, skipped)
        stats = DecodeStats()
        compiled = generate(model, ids, mask, plan, engine="static_compiled", stats=stats, **kwargs)
        assert stats.engine == "static_compiled"
        assert_same_rollout(generate(model, ids, mask, plan, engine="reference", **kwargs), compiled)
        compilations.append(stats.compilations)
    assert compilations[0] >= 1 and compilations[1:] == [0, 0, 0], compilations
    # Compaction moves to smaller buckets (compiled once each, before or now); tokens stay the reference's.
    compacted = generate(model, ids, mask, SkipPlan(6, (2,)), engine="static_compiled",
                         **dict(kwargs, compact_below=0.9, group_size=GROUP))
    assert_same_rollout(generate(model, ids, mask, SkipPlan(6, (2,)), engine="reference",
                                 **dict(kwargs, compact_below=0.9, group_size=GROUP)), compacted)


def test_the_scripted_layer_loop_decodes_the_eager_floats_and_compiles_once_per_process(models, monkeypatch):
    """"static" runs the layer loop under TorchScript's interpreter: the kernels of the eager functions
    ("static_eager"), so the same tokens and bit-identical behaviour log-probs, in float32 and bfloat16, with QKV
    biases (qwen2) and QK-norm (qwen3). TorchScript compiles the loop once per process: no later rollout (another
    skip set, architecture, dtype or batch) compiles anything."""
    import copy

    from nested_reft_ds import decode

    monkeypatch.setattr(decode, "_SCRIPTED", {})  # as in a fresh process
    compilations = []
    for arch in ("qwen2", "qwen3"):
        model, tok = models[arch]
        ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
        kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.2, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                      seed=5, compact_below=0.9)
        for dtype in (torch.float32, torch.bfloat16):
            typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            for skipped in [(2,), (0, 3)]:
                stats = DecodeStats()
                scripted = generate(typed, ids, mask, SkipPlan(6, skipped), engine="static", stats=stats, **kwargs)
                eager = generate(typed, ids, mask, SkipPlan(6, skipped), engine="static_eager", **kwargs)
                assert torch.equal(scripted.sequences, eager.sequences), (arch, dtype, skipped)
                assert torch.equal(scripted.behavior_logprobs, eager.behavior_logprobs), (arch, dtype, skipped)
                compilations.append(stats.compilations)
    assert compilations == [1] + [0] * 7, compilations


def test_scripting_refuses_package_files_changed_since_import(monkeypatch):
    """TorchScript reads a function's source from disk when it compiles: a package file rewritten under a running
    process (an editable install being edited, a shared checkout pulled) must stop the compile with an error that
    says so, not compile other code than the one running."""
    from nested_reft_ds import decode

    path = next(path for path in decode._SCRIPTED_SOURCES if path.name == "speculative.py")
    monkeypatch.setitem(decode._SCRIPTED_SOURCES, path, (0, 0))  # as if the file changed after import

    def not_compiled_yet(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    with pytest.raises(RuntimeError, match="speculative.py changed on disk since this process imported"):
        decode.scripted(not_compiled_yet)
    assert not_compiled_yet not in decode._SCRIPTED
    monkeypatch.undo()
    assert torch.equal(decode.scripted(not_compiled_yet)(torch.zeros(2)), torch.ones(2))


def fixed_shape_rollout(model, ids, mask, plan, step_mode, **kwargs):
    """`decode.static_generate` in a given step mode, with generate's defaults for what `kwargs` leaves out."""
    from nested_reft_ds.decode import static_generate

    arguments = dict(temperature=1.0, top_p=1.0, greedy=False, seed=0, row_keys=torch.arange(len(ids)), group_size=1,
                     compact_below=0.0)
    arguments.update(kwargs)
    arguments["eos_ids"] = torch.tensor(arguments.pop("eos_token_id"))
    return static_generate(model, ids, mask.long(), plan, step_mode=step_mode, **arguments)


@pytest.mark.parametrize("step_mode", ["scripted", "eager", "fixed"])
def test_host_reads_every_k_steps_decode_the_reference_tokens(models, step_mode):
    """The engine runs the steps between two host reads in one call (`decode_steps`) and compacts only at a read:
    for any read interval, including one that does not divide the token budget and one read per step, the tokens
    and log-probs are the reference engine's, with rows ending at EOS and compaction."""
    model, tok = models["qwen3"]
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    max_new = 13
    kwargs = dict(max_new_tokens=max_new, temperature=1.2, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                  seed=5, compact_below=0.9, group_size=GROUP)
    plan = SkipPlan(6, (1, 4))
    reference = generate(model, ids, mask, plan, engine="reference", row_keys=torch.arange(len(ids)), **kwargs)
    compactions = []
    for sync_every in (1, 3, 8):
        stats = DecodeStats()
        tokens, completion_mask, logprobs = fixed_shape_rollout(model, ids, mask, plan, step_mode,
                                                                sync_every=sync_every, stats=stats, **kwargs)
        width = reference.completions.shape[1]
        assert torch.equal(tokens[:, :width], reference.completions), sync_every
        assert torch.equal(completion_mask[:, :width], reference.completion_mask), sync_every
        assert not completion_mask[:, width:].any()
        torch.testing.assert_close(logprobs[:, :width], reference.behavior_logprobs, atol=1e-5, rtol=0)
        # One read per `sync_every` steps, plus the one that finds every row finished if the budget is not spent.
        reads = -(-stats.steps // sync_every)
        assert stats.host_reads in (reads, reads + 1), (sync_every, stats.host_reads, stats.steps)
        compactions.append(stats.compactions)
    assert compactions[0] > 0  # reading every step, finished rows do leave the batch


def test_the_fixed_shape_step_graphs_capture_samples_the_eager_tokens(models):
    """`fixed_layer_step` (what torch.compile and the CUDA graphs run: the write column a tensor, attention over every
    cache column with the unfilled ones masked, the cache length rounded up to COLUMN_BUCKET) decodes what the
    eager step decodes, with compaction and shared prefill too."""
    model, tok = models["qwen2"]
    ids, mask = encode_prompts(tok, [p for p in PROMPTS for _ in range(GROUP)], "cpu")
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.2, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                  seed=11, compact_below=0.9, group_size=GROUP)
    from nested_reft_ds import decode

    held = model.__dict__.setdefault(decode.HELD_GRAPHS, {})
    held.pop(decode.DecodeGraphs, None)
    captures = []
    for plan in (SkipPlan(6, (2,)), SkipPlan(6, (0, 3)), SkipPlan(6, (1, 4))):
        eager = fixed_shape_rollout(model, ids, mask, plan, "eager", **kwargs)
        fixed = fixed_shape_rollout(model, ids, mask, plan, "fixed", **kwargs)
        assert torch.equal(fixed[0], eager[0]) and torch.equal(fixed[1], eager[1])
        torch.testing.assert_close(fixed[2], eager[2], atol=1e-5, rtol=0)
        # The graph path's buffers, bucket inputs and capture bookkeeping (`DecodeGraphs`), its "graphs" replayed
        # eagerly off CUDA: the fixed step's floats; a new skip set captures nothing at the buckets already met.
        stats = DecodeStats()
        buckets_before = set(getattr(held.get(decode.DecodeGraphs), "inputs", {}))
        graphed = fixed_shape_rollout(model, ids, mask, plan, "graphs", stats=stats, **kwargs)
        assert torch.equal(graphed[0], fixed[0]) and torch.equal(graphed[1], fixed[1])
        torch.testing.assert_close(graphed[2], fixed[2], atol=1e-6, rtol=0)
        new_buckets = set(held[decode.DecodeGraphs].inputs) - buckets_before
        assert stats.compactions >= 1 and stats.captures == (6 + 2) * len(new_buckets)  # layers, embedding, head
        captures.append(stats.captures)
        # Capture runs the layers this rollout skips too (their weights not loaded): what they wrote stays finite,
        # since a later skip set attends over those columns masked.
        cache = held[decode.DecodeGraphs].cache
        assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()
    assert captures[0] > 0 and captures[1] == 0, captures
    with pytest.raises(ValueError, match="need a CUDA device"):
        generate(model, ids, mask, SkipPlan(6), max_new_tokens=3, eos_token_id=STOPS, pad_token_id=tok.pad_token_id,
                 engine="static_graphs")
