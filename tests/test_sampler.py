"""Eval sampler: greedy parity with transformers, sampling distributions, n samples, stop
strings, sharding and bounded compilation (tiny local checkpoints, CPU)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import FAMILIES, VOCAB, hf_logits, make_hf_model, save_hf_model, save_word_tokenizer

import dcd_jax
from dcd_jax.infer import sampler as sampler_mod
from dcd_jax.infer.sampler import (
    Sampler,
    SamplingConfig,
    batch_bucket_size,
    generate_tokens,
    prompt_bucket_length,
    row_keys,
    sample_logits,
)

MAX_NEW = 10


def _split(model):
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def _prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(2, VOCAB, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = save_hf_model("qwen2", tmp_path_factory.mktemp("qwen2"))
    save_word_tokenizer(d, 90)  # fewer tokenizer entries than embedding rows: those are never generated
    return d


@pytest.fixture(scope="module")
def qwen2_sampler(qwen2_dir):
    from transformers import PreTrainedTokenizerFast  # (AutoTokenizer would pick Qwen2's BPE class)

    return Sampler.from_model(dcd_jax.load_hf(qwen2_dir), PreTrainedTokenizerFast.from_pretrained(str(qwen2_dir)))


def _hf_greedy(hf_model, prompts, max_new, eos):
    """transformers generate (greedy) on the left-padded batch; ids after EOS dropped."""
    import torch

    p = max(map(len, prompts))
    ids = np.zeros((len(prompts), p), np.int64)
    mask = np.zeros((len(prompts), p), np.int64)
    for r, x in enumerate(prompts):
        ids[r, p - len(x):], mask[r, p - len(x):] = x, 1
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
        )
    rows = []
    for row in out[:, p:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


def _assert_logprobs_match_hf(hf_model, prompts, completions):
    """Each completion's per-token log-probs equal transformers' on prompt + completion."""
    for prompt, c in zip(prompts, completions):
        seq = np.asarray([prompt + c.token_ids])
        logits = hf_logits(hf_model, seq)[0].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        at = np.arange(len(prompt) - 1, seq.shape[1] - 1)
        np.testing.assert_allclose(c.logprobs, logp[at, seq[0, at + 1]], atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_generate(family, tmp_path):
    hf_model = make_hf_model(family)
    sampler = Sampler.from_model(dcd_jax.load_hf(save_hf_model(family, tmp_path / family)))
    prompts = _prompts(0, [3, 11, 7, 16, 1])
    free = _hf_greedy(hf_model, prompts, MAX_NEW, None)
    # An EOS that stops some rows mid-way while others run to the budget.
    eos = next(
        t for row in free for t in row[2:-2]
        if sum(t in r for r in free) < len(free) and t not in row[:2]
    )
    ref = _hf_greedy(hf_model, prompts, MAX_NEW, eos)
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, eos_token_ids=(eos,), batch_size=8, logprobs=True)
    out = sampler.generate(prompts, cfg)
    got = [c[0].token_ids for c in out]
    assert got == ref
    reasons = [c[0].finished_by for c in out]
    assert "eos" in reasons and "length" in reasons
    for c, r in zip(out, ref):
        assert c[0].num_tokens == len(r) and (c[0].finished_by == "eos") == (r[-1] == eos)
    # Cached decoding sees exactly what a full forward pass sees: per-token log-probs of the
    # generated ids equal transformers' on prompt + completion (a sensitive check of positions,
    # cache slots and masks, which greedy ids of a tiny random model may not detect).
    _assert_logprobs_match_hf(hf_model, prompts, [c[0] for c in out])


def test_batch_one_decode_updates_the_cache_in_place(tmp_path):
    """Batch 1 with one KV head (qwen3 fixture): the CPU per-layer KV buffers drop both size-1
    dims (keys [hd, S], values [S, hd]), the decode program copies no KV buffer (XLA:CPU
    duplicated the in-place update of a [1, 1, S, hd] buffer and copied it, four times per layer
    per step: decode time grew with the cache), and greedy tokens and per-token log-probs still
    equal transformers'."""
    import re

    hf_model = make_hf_model("qwen3")
    model = dcd_jax.load_hf(save_hf_model("qwen3", tmp_path / "qwen3"))
    sampler = Sampler.from_model(model)
    prompt = _prompts(5, [9])
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, eos_token_ids=(), batch_size=1, logprobs=True)
    out = sampler.generate(prompt, cfg)[0][0]
    assert out.token_ids == _hf_greedy(hf_model, prompt, MAX_NEW, None)[0]
    _assert_logprobs_match_hf(hf_model, prompt, [out])

    cache = model.init_cache(1, 24, per_layer=True)
    slots, hd = 24, model.cfg.head_dim
    assert all(x.shape == (hd, slots) for x in cache["k"]) and all(x.shape == (slots, hd) for x in cache["v"])
    ids = np.asarray(prompt, np.int32)
    args = (sampler.graphdef, sampler.params, ids, np.ones_like(ids), row_keys(0, [0], [0]), np.float32(1.0),
            np.float32(1.0), sampler.cpu_decode_weights())
    hlo = sampler_mod._generate_jit.lower(*args, spec=sampler_mod._spec_of(cfg, (), 0)).compile().as_text()
    slots = ids.shape[1] + MAX_NEW - 1
    buffer = rf"f32\[(?:1,)?(?:1,)?(?:{slots},{hd}|{hd},{slots})\]"
    assert re.search(buffer, hlo), "the KV buffers should appear in the decode program"
    copies = re.findall(rf"= {buffer}\S* copy\(", hlo)
    assert not copies, f"{len(copies)} copies of a KV buffer in the decode program"


def test_long_prompt_prefill_attends_blockwise_and_matches_transformers(tmp_path):
    """A prefill writes slots [0, P): it attends over its own rows with the training pass's causal
    kernel (query blocks, upper triangle skipped), not over the whole cache: greedy tokens and
    per-token log-probs equal transformers' across several query blocks, and the compiled program
    never forms the [.., P * G, S] score tensor of a dense pass over the cache."""
    import re

    hf_model = make_hf_model("qwen2")
    sampler = Sampler.from_model(dcd_jax.load_hf(save_hf_model("qwen2", tmp_path / "qwen2")))
    prompts = _prompts(6, [200, 131])
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, eos_token_ids=(), batch_size=2, logprobs=True)
    out = sampler.generate(prompts, cfg)
    assert [c[0].token_ids for c in out] == _hf_greedy(hf_model, prompts, MAX_NEW, None)
    _assert_logprobs_match_hf(hf_model, prompts, [c[0] for c in out])

    p = prompt_bucket_length(200, cfg.prompt_bucket)
    ids = np.asarray([x + [0] * (p - len(x)) for x in prompts], np.int32)
    args = (sampler.graphdef, sampler.params, ids, (ids > 0).astype(np.int32), row_keys(0, [0, 1], [0, 0]),
            np.float32(1.0), np.float32(1.0), sampler.cpu_decode_weights())
    hlo = sampler_mod._generate_jit.lower(*args, spec=sampler_mod._spec_of(cfg, (), 0)).compile().as_text()
    groups, slots = 6 // 2, p + MAX_NEW - 1
    assert re.search(rf"f32\[[0-9,]*,{slots}\]", hlo), "the decode steps' scores over the cache should appear"
    assert not re.search(rf"[\[,]{p * groups},{slots}\]", hlo), "a dense [P * G, S] score tensor in the prefill"


# Most tests share one compiled program shape (batch bucket 4, prompt bucket 16, 8 new tokens):
# on 2 CPU cores compilation, not generation, is what these tests spend their time on.
STD = SamplingConfig(max_new_tokens=8, eos_token_ids=(), batch_size=4)
SAMPLED = dataclasses.replace(STD, temperature=1.0, top_k=20, top_p=0.9, eos_token_ids=(4, 6, 7))


def test_low_temperature_and_top_k1_equal_greedy_and_padding_side_is_irrelevant(qwen2_sampler):
    s = qwen2_sampler
    prompts = _prompts(1, [4, 9, 13, 2])
    greedy = [c[0].token_ids for c in s.generate(prompts, STD)]
    for cfg in (dataclasses.replace(STD, temperature=1e-6, seed=3),
                dataclasses.replace(STD, temperature=1.0, top_k=1, seed=4),
                dataclasses.replace(SAMPLED, top_p=1e-6, seed=5)):  # (SAMPLED's EOS ids do not occur here)
        assert [c[0].token_ids for c in s.generate(prompts, cfg)] == greedy, cfg
    assert len({tuple(g) for g in greedy}) > 1  # the prompts do lead to different outputs
    assert not set(SAMPLED.eos_token_ids) & {t for g in greedy for t in g}
    sampled = [c[0].token_ids for c in s.generate(prompts, dataclasses.replace(STD, temperature=1.0, seed=3))]
    assert sampled != greedy  # (same program as temperature 1e-6: the value is a runtime input)

    # The jitted core left-aligns right-padded prompts itself.
    p = 16
    left, right = np.zeros((4, p), np.int32), np.zeros((4, p), np.int32)
    for r, x in enumerate(prompts):
        left[r, p - len(x):], right[r, : len(x)] = x, x
    keys = row_keys(0, range(4), [0] * 4)
    outs = [jax.device_get(generate_tokens(s.graphdef, s.params, ids, (ids > 0).astype(np.int32), keys, STD))
            for ids in (left, right)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outs[0][0], np.asarray(greedy))


def _next_token_logits(sampler, prompt):
    model = nnx.merge(sampler.graphdef, sampler.params)
    return np.asarray(model(np.asarray([prompt], np.int32)))[0, -1].astype(np.float64)


def _softmax(x):
    x = np.exp(x - x.max())
    return x / x.sum()


def _check_frequencies(counts, probs, n):
    freq = counts / n
    tol = 4.5 * np.sqrt(probs * (1 - probs) / n) + 1.5 / n
    assert np.all(np.abs(freq - probs) <= tol), np.stack([freq, probs])[:, np.abs(freq - probs) > tol]


def test_sampling_frequencies_match_the_model_distribution(qwen2_sampler):
    """End to end: draws of the first new token follow softmax(logits / T) over the tokenizer's
    vocabulary (embedding rows past it are never drawn)."""
    s, n = qwen2_sampler, 4096
    prompt = _prompts(2, [6])[0]
    logits = _next_token_logits(s, prompt)
    true_vocab = nnx.merge(s.graphdef, s.params).cfg.tokenizer_vocab_size
    assert true_vocab < VOCAB
    cfg = SamplingConfig(max_new_tokens=1, n=n, batch_size=n, eos_token_ids=(), temperature=0.25, seed=1)
    toks = [c.token_ids[0] for c in s.generate([prompt], cfg)[0]]
    counts = np.bincount(toks, minlength=VOCAB).astype(np.float64)
    probs = np.zeros(VOCAB)
    probs[:true_vocab] = _softmax(logits[:true_vocab] / 0.25)
    assert counts[true_vocab:].sum() == 0
    _check_frequencies(counts, probs, n)


def test_sampling_step_frequencies_on_toy_distributions():
    n = 8192
    keys = row_keys(5, range(n), [0] * n)

    def counts(logits, **kw):
        draws = np.asarray(sample_logits(np.tile(np.asarray(logits, np.float32), (n, 1)), keys, SamplingConfig(**kw)))
        return np.bincount(draws, minlength=len(logits)).astype(np.float64)

    # A 2-token distribution: p(a) = sigmoid((l_a - l_b) / T).
    two = np.array([-1e9, 1.0, -1e9, 0.2])
    for t in (1.0, 0.5):
        _check_frequencies(counts(two, temperature=t), _softmax(two / t), n)
    # top_k=2 turns a 5-token distribution into the 2-token distribution of its two best logits.
    five = np.array([0.3, 1.2, -0.5, 0.9, 0.0])
    want = np.zeros(5)
    want[[1, 3]] = _softmax(five[[1, 3]])
    _check_frequencies(counts(five, temperature=1.0, top_k=2), want, n)
    # top_p keeps the smallest set of best tokens whose mass reaches top_p, renormalized.
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    for top_p, keep in ((0.75, [1, 3]), (0.85, [1, 3, 2]), (0.3, [1])):
        want = np.zeros(4)
        want[keep] = probs[keep] / probs[keep].sum()
        _check_frequencies(counts(np.log(probs), temperature=1.0, top_p=top_p), want, n)
    # Greedy is the argmax; temperature -> 0 approaches it.
    assert counts(five).tolist() == [0, n, 0, 0, 0]
    assert counts(five, temperature=1e-6).tolist() == [0, n, 0, 0, 0]


def test_n_samples_differ_and_are_reproducible(qwen2_sampler):
    s = qwen2_sampler
    prompts = _prompts(3, [5, 12])
    cfg = dataclasses.replace(STD, temperature=1.0, n=2, seed=7)
    a = s.generate(prompts, cfg)
    assert [len(c) for c in a] == [2, 2]
    for completions in a:
        assert completions[0].token_ids != completions[1].token_ids
        assert all(c.num_tokens == 8 and c.finished_by == "length" for c in completions)
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]
    assert ids(s.generate(prompts, cfg)) == ids(a)
    assert ids(s.generate(prompts, dataclasses.replace(cfg, seed=8))) != ids(a)
    # Random streams belong to (prompt, sample), not batch slots: with two more prompts the rows
    # are chunked and grouped differently (sorted by length), the completions stay the same.
    more = s.generate(prompts + _prompts(4, [3, 9]), cfg)
    assert ids(more[:2]) == ids(a)


def test_text_prompts_eos_and_stop_strings(qwen2_sampler):
    s = qwen2_sampler
    prompts = ["w5 w7 w9", "w11 w3", "w40 w41 w42 w43 w44"]
    free = [c[0] for c in s.generate(prompts, STD)]
    assert free[0].text == s.tokenizer.decode(free[0].token_ids) and free[0].finished_by == "length"

    # Stop on the words of tokens 3-4 of the first completion: its text ends before their first
    # occurrence, its ids after the token that completes them. An EOS id taken from the second
    # completion ends that one: the id is kept in token_ids, not in the text.
    stop = " ".join(free[0].text.split(" ")[3:5])
    first = next(m for m in range(1, 9) if stop in s.tokenizer.decode(free[0].token_ids[:m]))
    k = next(i for i, t in enumerate(free[1].token_ids) if i > 0 and t not in free[1].token_ids[:i])
    eos = free[1].token_ids[k]
    assert first <= 5 and eos not in free[0].token_ids[:first]  # (preconditions on the fixture)
    cfg = dataclasses.replace(STD, stop_strings=("zzz", stop), eos_token_ids=(eos,))
    out = [c[0] for c in s.generate(prompts, cfg)]
    assert out[0].finished_by == "stop"
    assert out[0].text == free[0].text[: free[0].text.index(stop)] and stop not in out[0].text
    assert out[0].token_ids == free[0].token_ids[:first] and out[0].num_tokens == first
    assert out[1].finished_by == "eos" and out[1].token_ids == free[1].token_ids[: k + 1]
    assert out[1].text == s.tokenizer.decode(free[1].token_ids[:k]) and out[1].num_tokens == k + 1
    f = free[2].token_ids
    if eos in f:
        assert out[2].finished_by == "eos" and out[2].token_ids == f[: f.index(eos) + 1]
    elif stop not in free[2].text:
        assert out[2].token_ids == f and out[2].finished_by == "length"
    with pytest.raises(ValueError, match="empty"):
        s.generate([[]], STD)


def test_sharded_sampling_equals_single_device(qwen2_dir, qwen2_sampler):
    from dcd_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = Sampler.from_model(dcd_jax.load_hf(qwen2_dir, mesh=mesh), qwen2_sampler.tokenizer, mesh=mesh)
    q = sharded.params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[2] == "tensor"  # tensor-parallel weights
    prompts = _prompts(4, [3, 14, 9, 6])
    sampled = dataclasses.replace(SAMPLED, n=2, seed=1)
    for cfg in (STD, sampled):
        single = qwen2_sampler.generate(prompts, cfg)
        multi = sharded.generate(prompts, cfg)
        assert [[c.token_ids for c in cs] for cs in multi] == [[c.token_ids for c in cs] for cs in single]
        reasons = [c.finished_by for cs in single for c in cs]
        assert [c.finished_by for cs in multi for c in cs] == reasons
    assert "eos" in reasons and "length" in reasons  # rows stopped early while others ran on


def test_eos_ids_default_to_the_tokenizer_and_generation_config(tmp_path):
    """Without ``eos_token_ids`` a row ends at the tokenizer's EOS or at any ``eos_token_id`` of the
    generation_config.json beside the tokenizer (Gemma 3 lists end of text and end of turn)."""
    from transformers import PreTrainedTokenizerFast

    save_word_tokenizer(tmp_path, 20)  # "<eos>" = 1
    load = lambda: Sampler(None, None, PreTrainedTokenizerFast.from_pretrained(str(tmp_path)))
    assert load()._eos_ids(SamplingConfig()) == (1,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
    assert load()._eos_ids(SamplingConfig()) == (1, 7)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 9}')
    assert load()._eos_ids(SamplingConfig()) == (1, 9)
    assert load()._eos_ids(SamplingConfig(eos_token_ids=(3,))) == (3,)
    assert load()._eos_ids(SamplingConfig(eos_token_ids=())) == ()
    assert Sampler(None, None)._eos_ids(SamplingConfig()) == ()


def test_bucketing_bounds_compilations(qwen2_sampler):
    assert [prompt_bucket_length(n, 8) for n in (1, 5, 8, 9, 12)] == [8, 8, 8, 16, 16]
    assert [prompt_bucket_length(n, "pow2") for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [batch_bucket_size(n, 64) for n in (1, 2, 3, 33, 64)] == [1, 2, 4, 64, 64]
    assert batch_bucket_size(3, 64, multiple=8) == 8
    s = qwen2_sampler
    cfg = dataclasses.replace(STD, prompt_bucket=8)

    def new_programs(lengths, cfg):
        """Programs the jitted core compiled for these calls (its cache grows by one per new shape / spec)."""
        before = sampler_mod._generate_jit._cache_size()
        for n in lengths:
            s.generate(_prompts(n, [n] * 4), cfg)
        return sampler_mod._generate_jit._cache_size() - before

    # Prompt lengths 5, 7, 12 -> buckets 8 and 16: at most two programs (16 may already exist).
    assert 1 <= new_programs((5, 7, 12, 5, 12), cfg) <= 2
    # Other seeds or temperatures reuse the programs; another bucket compiles one more.
    assert new_programs((5, 12), dataclasses.replace(cfg, seed=12)) == 0
    assert new_programs((20,), cfg) == 1


def test_greedy_tokens_is_numpy_argmax_with_ties_and_masked_columns():
    """The two-reduction argmax picks the first maximal index, like np.argmax, on ties, -inf
    (masked vocabulary) columns and rows whose maximum sits in the last column."""
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 3, size=(64, 37)).astype(np.float32)  # small integers: many ties
    logits[:, 30:] = -np.inf
    logits[5] = -np.inf
    logits[5, 36] = 1.0  # the only finite entry is the last column
    logits[6] = 0.0  # all equal: the first index
    got = np.asarray(sampler_mod.greedy_tokens(jax.numpy.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[5] == 36 and got[6] == 0


def test_cpu_decode_layout_equals_accelerator_layout(qwen2_sampler, monkeypatch):
    """On CPU the loop carries per-layer heads-major KV buffers and fused q/k/v, gate/up and [D, V]
    unembedding copies (made once per Sampler); elsewhere the stacked [L, B, KV, S, hd] cache and
    the params as they are. Both programs (the accelerator one traced here on CPU) give the same
    tokens and per-token logprobs, greedy and sampled, on left-padded prompts of mixed lengths."""
    import dcd_jax.models.transformer as transformer

    s = qwen2_sampler
    prompts = _prompts(7, [3, 13, 8, 1, 10])
    configs = [dataclasses.replace(STD, logprobs=True), dataclasses.replace(SAMPLED, n=2, seed=3, logprobs=True)]
    assert s.cpu_decode_weights() is s.cpu_decode_weights()  # made once, reused by every batch

    def run():
        sampler_mod._generate_jit.clear_cache()  # the layout is chosen at trace time
        return [s.generate(prompts, cfg) for cfg in configs]

    cpu = run()
    monkeypatch.setattr(sampler_mod, "traced_for_cpu", lambda: False)
    monkeypatch.setattr(transformer, "traced_for_cpu", lambda: False)
    accelerator = run()
    sampler_mod._generate_jit.clear_cache()
    for got, want in zip(cpu, accelerator):
        flat_got, flat_want = [c for cs in got for c in cs], [c for cs in want for c in cs]
        assert [c.token_ids for c in flat_got] == [c.token_ids for c in flat_want]
        for a, b in zip(flat_got, flat_want):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5, rtol=0)
    assert len({tuple(c.token_ids) for cs in cpu[1] for c in cs}) > 3  # sampled rows differ


def test_finished_rows_leave_the_batch_and_every_output_is_unchanged(qwen2_sampler):
    """With ``min_rows`` the decode loop halves its batch (32 -> 16 -> 8 rows) whenever no more than
    half of it is still generating: rows ending early (EOS) stop being decoded. Tokens, lengths and
    finished flags of every row equal those of the loop that decodes all rows to the end (log-probs
    to fp32 rounding), greedy and sampled, with padding rows in the batch."""
    s = qwen2_sampler
    assert sampler_mod.row_stages(32, 8) == [32, 16, 8]
    assert sampler_mod.row_stages(24, 8) == [24, 12]
    assert sampler_mod.row_stages(1, 8) == [1] and sampler_mod.row_stages(32, 0) == [32]
    prompts = _prompts(11, [3 + i % 7 for i in range(28)])
    p, b, max_new = 12, 32, 12
    ids = np.zeros((b, p), np.int32)
    for r, x in enumerate(prompts):  # rows 28..31: padding rows
        ids[r, p - len(x):] = x
    mask = (ids > 0).astype(np.int32)
    keys = row_keys(0, range(b), [0] * b)
    for base in (SamplingConfig(max_new_tokens=max_new, eos_token_ids=()),
                 SamplingConfig(max_new_tokens=max_new, eos_token_ids=(), temperature=0.3, logprobs=True)):
        # EOS ids the rows generate at different steps (random weights: the commonest tokens).
        free = np.asarray(generate_tokens(s.graphdef, s.params, ids, mask, keys, base)[0])[:28]
        for n in range(1, 6):
            eos = tuple(int(t) for t in np.argsort(-np.bincount(free.ravel()), kind="stable")[:n])
            first = [min([row.index(t) for t in eos if t in row], default=max_new) for row in free.tolist()]
            if sum(f < max_new - 2 for f in first) > 16:  # most rows end early
                break
        assert len(set(first)) > 3 and sum(f < max_new - 2 for f in first) > 16, first
        cfg = dataclasses.replace(base, eos_token_ids=eos)
        full = jax.device_get(generate_tokens(s.graphdef, s.params, ids, mask, keys, cfg))
        staged = jax.device_get(generate_tokens(s.graphdef, s.params, ids, mask, keys, cfg, min_rows=8))
        for a, c in zip(full[:3], staged[:3]):  # tokens, lengths, finished
            np.testing.assert_array_equal(a, c)
        if cfg.logprobs:  # (a batch of another size may round the last bit differently)
            np.testing.assert_allclose(staged[3], full[3], rtol=0, atol=1e-5)
        assert not full[2][28:].any()  # padding rows never finish
        args = (s.graphdef, s.params, ids, mask, keys, np.float32(1.0), np.float32(1.0))
        loops = [sampler_mod._generate_jit.lower(*args, spec=sampler_mod._spec_of(cfg, (), 0, rows)).as_text()
                 .count("stablehlo.while") for rows in (0, 8)]
        assert loops[1] == 3 * loops[0]  # the decode loop (and the loops inside it) for each of 3 batch sizes


def test_finished_rows_leave_the_stacked_cache_too(qwen2_sampler, monkeypatch):
    """The accelerator layout (one stacked [L, B, ...] KV cache, traced here on CPU) moves rows the
    same way: a 16-row batch halved down to 4 rows gives the full loop's tokens and lengths."""
    s = qwen2_sampler
    monkeypatch.setattr(sampler_mod, "traced_for_cpu", lambda: False)
    b, p, max_new = 16, 9, 10
    ids = np.zeros((b, p), np.int32)
    for r, x in enumerate(_prompts(12, [2 + i % 7 for i in range(b)])):
        ids[r, p - len(x):] = x
    mask = (ids > 0).astype(np.int32)
    keys = row_keys(0, range(b), [0] * b)
    free = np.asarray(generate_tokens(s.graphdef, s.params, ids, mask, keys,
                                      SamplingConfig(max_new_tokens=max_new, eos_token_ids=()))[0])
    eos = tuple(int(t) for t in np.argsort(-np.bincount(free.ravel()), kind="stable")[:3])
    cfg = SamplingConfig(max_new_tokens=max_new, eos_token_ids=eos)
    full = jax.device_get(generate_tokens(s.graphdef, s.params, ids, mask, keys, cfg))
    staged = jax.device_get(generate_tokens(s.graphdef, s.params, ids, mask, keys, cfg, min_rows=4))
    assert full[2].sum() > b // 2  # enough rows end for the batch to halve
    for a, c in zip(full, staged):
        np.testing.assert_array_equal(a, c)
