"""Gemma 3 text (model_type gemma3_text) against transformers on tiny random Gemma3ForCausalLM
checkpoints built here: logits (packed segments, positions far past the sliding window, GQA and
MQA), every training kernel with the window (einsum/blockwise, xla, splash interpreted, the layer
scan with per-layer flags), the scorer's log-probs, greedy decoding, sharding, and the config
translation (older config layouts, refusals).

The common parity tests (tests/test_models.py, test_convert.py, test_sampler.py) also run the
``gemma3_text`` fixture of tests/hf_fixtures.py (GQA, window 4, local/global/local layers).
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import FAMILIES, VOCAB, hf_logits, make_hf_model, read_config, save_hf_model

import dcd_jax
from dcd_jax.convert.hf_to_flax import load_hf_params, open_hf_checkpoint
from dcd_jax.models import ModelConfig, UnsupportedModelError, abstract_model, bind
from dcd_jax.models import transformer

# MQA, window 5, a global layer first, head_dim 24 != hidden / heads, no rope scaling.
MQA = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24, sliding_window=5, query_pre_attn_scalar=24,
           layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
           num_hidden_layers=4, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
VARIANTS = {"gqa": {}, "mqa": MQA}


def _pair(variant, tmp_path_factory):
    """(torch model, checkpoint dir, dcd-jax model) of one variant."""
    overrides = VARIANTS[variant]
    d = save_hf_model("gemma3_text", tmp_path_factory.mktemp(variant), **overrides)
    return make_hf_model("gemma3_text", **overrides), d, dcd_jax.load_hf(d)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


# The heavier checks run on one variant each (the other's logits, decoding and round trip run in
# the common parity tests through the gemma3_text fixture): MQA here, GQA for sharding.
@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    return _pair("mqa", tmp_path_factory)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return _pair("gqa", tmp_path_factory)


def _packed(rng):
    """One row packing a 13-token and a 9-token example (both well past the window) and 2 pads."""
    a, b = rng.randint(0, VOCAB, 13), rng.randint(0, VOCAB, 9)
    ids = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 13 + [2] * 9 + [0] * 2], np.int32)
    positions = np.array([list(range(13)) + list(range(9)) + [0, 0]], np.int32)
    return a, b, ids, positions, segments


def test_config_switches(pair):
    _, _, model = pair
    cfg = model.cfg
    assert cfg.model_type == "gemma3_text" and cfg.mlp_activation == "gelu_tanh"
    assert cfg.norm_plus_one and cfg.sandwich_norms and cfg.embed_scale and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.has_local_layers and not all(cfg.local_layers) and cfg.rope_local is not None
    assert cfg.attention_scale == pytest.approx(cfg.query_pre_attn_scalar ** -0.5)


def test_logits_packed_segments_past_the_window(pair):
    hf_model, _, model = pair
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (2, 30)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf_model, ids), atol=2e-4, rtol=0)
    a, b, ids, positions, segments = _packed(rng)
    out = np.asarray(model(ids, positions=positions, segment_ids=segments))
    np.testing.assert_allclose(out[0, :13], hf_logits(hf_model, a[None])[0], atol=2e-4, rtol=0)
    np.testing.assert_allclose(out[0, 13:22], hf_logits(hf_model, b[None])[0], atol=2e-4, rtol=0)


def _loss_and_grads(d, ids, positions, segments, **runtime):
    ckpt = open_hf_checkpoint(d)
    cfg = ModelConfig.from_hf_config(ckpt.hf_config, **runtime)
    graphdef, _, _ = abstract_model(cfg)
    params = load_hf_params(ckpt, cfg)
    real = segments > 0
    weights = np.random.RandomState(5).normal(size=(*ids.shape, VOCAB)).astype(np.float32)

    def loss(p):
        logits = bind(graphdef, p)(ids, positions=positions, segment_ids=segments)
        return (logits * weights * real[..., None]).sum() / 100.0, logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(value), np.asarray(logits)[real], jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("variant", ["scan", "scan_remat", "xla",
    "splash"])
def test_kernels_and_the_layer_scan_equal_the_unrolled_einsum_pass(mqa, variant, monkeypatch):
    """The layer scan (per-layer local flags as a scanned input, the RoPE table and window selected
    by them; with remat too), attention="xla" (the window in its mask) and attention="splash"
    (LocalMask; a lax.cond between the two kernels under the scan) give the unrolled einsum pass's
    loss, logits and gradients on a packed row past the window."""
    _, d, _ = mqa
    _, _, ids, positions, segments = _packed(np.random.RandomState(1))
    want = _loss_and_grads(d, ids, positions, segments)
    runtime = {"scan": {}, "scan_remat": {"remat": "full"}, "xla": {"attention": "xla"}, "splash": {"attention": "splash"}}
    if variant != "xla":
        monkeypatch.setattr(transformer, "MAX_UNROLLED_LAYERS", 0)  # the scan path
    got = _loss_and_grads(d, ids, positions, segments, **runtime[variant])
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
    assert np.abs(got[2]["layers"]["attn"]["k_proj"]["kernel"]).max() > 1e-4


def test_window_is_exclusive_at_its_size():
    """HF's sliding window (masking_utils.sliding_window_overlay: kv > q - window): a key exactly
    ``window`` slots back is hidden, one ``window - 1`` back is seen; the blockwise kernel, the
    dense mask and the cache bias agree."""
    from dcd_jax.models.transformer import attention_mask, blockwise_causal_attention, cache_bias, cached_attention

    seg = np.ones((1, 9), np.int32)
    slots = np.arange(9, dtype=np.int32)[None]
    mask = np.asarray(attention_mask(seg, slots, seg, slots, 3))[0, 0, 0]
    assert mask[5, 3] and not mask[5, 2] and mask[5, 5] and not mask[5, 6]
    assert (np.asarray(cache_bias(seg, slots, seg, 3))[0] == 0).tolist() == mask.tolist()
    rng = np.random.RandomState(2)
    q, k, v = (jax.numpy.asarray(rng.normal(size=s), np.float32) for s in [(1, 9, 2, 4), (1, 9, 1, 4), (1, 9, 1, 4)])
    dense = cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), cache_bias(seg, slots, seg, 3),
                             scale=0.3)
    blockwise = blockwise_causal_attention(q, k, v, seg, block=4, scale=0.3, window=3)
    np.testing.assert_allclose(np.asarray(blockwise), np.asarray(dense), atol=1e-5)


def test_scorer_logprobs_match_transformers(mqa):
    from dcd_jax.infer.scorer import make_scorer, pad_to_bucket

    hf_model, _, model = mqa
    graphdef, state = nnx.split(model)
    score = make_scorer(graphdef, model.cfg.tokenizer_vocab_size, topk=2, chunk_size=32)
    rng = np.random.RandomState(3)
    seqs = [rng.randint(0, VOCAB, n).tolist() for n in (21, 8)]
    ids, seg = pad_to_bucket(seqs, 2, 8)
    logp = np.asarray(score(nnx.to_pure_dict(state), ids, seg)[0])
    for row, s in enumerate(seqs):
        logits = hf_logits(hf_model, np.asarray([s]))[0].astype(np.float64)
        ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        np.testing.assert_allclose(logp[row, : len(s) - 1], ref[np.arange(len(s) - 1), s[1:]], atol=2e-4, rtol=0)


def test_greedy_decode_and_logprobs_match_transformers_generate(mqa):
    """Cached decoding (prefill through the blockwise kernel, then a step per token over a cache
    that keeps every slot, the local layers' bias masking it to the window) equals transformers'
    generate on left-padded prompts longer and shorter than the window; batch 1 too (the CPU
    per-layer buffers without their size-1 dims, for MQA)."""
    from test_sampler import _assert_logprobs_match_hf, _hf_greedy, _prompts

    from dcd_jax.infer.sampler import Sampler, SamplingConfig

    hf_model, _, model = mqa
    sampler = Sampler.from_model(model)
    for prompts, batch in ((_prompts(0, [3, 11, 7, 2]), 4), (_prompts(9, [9]), 1)):
        cfg = SamplingConfig(max_new_tokens=12, eos_token_ids=(), batch_size=batch, logprobs=True)
        out = [c[0] for c in sampler.generate(prompts, cfg)]
        assert [c.token_ids for c in out] == _hf_greedy(hf_model, prompts, 12, None)
        _assert_logprobs_match_hf(hf_model, prompts, out)


def test_sharded_equals_single_device(gqa):
    """Params on a data x fsdp x tensor mesh of 8 CPU devices: the same logits on a packed row, and
    the same greedy tokens."""
    from dcd_jax.infer.sampler import Sampler, SamplingConfig
    from dcd_jax.sharding import make_mesh
    from test_sampler import _prompts

    _, d, model = gqa
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = dcd_jax.load_hf(d, mesh=mesh)
    rng = np.random.RandomState(4)
    _, _, ids, positions, segments = _packed(rng)
    ids, positions, segments = (np.concatenate([x, x[:, ::-1]] * 2) for x in (ids, positions, segments))
    graphdef, state = nnx.split(sharded)
    assert nnx.to_pure_dict(state)["layers"]["attn"]["q_proj"]["kernel"].sharding.spec[2] == "tensor"
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda p: bind(graphdef, p)(ids, positions=positions, segment_ids=segments))
        got = np.asarray(forward(nnx.to_pure_dict(state)))
    want = np.asarray(model(ids, positions=positions, segment_ids=segments))
    real = segments > 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=0)
    prompts = _prompts(4, [3, 14, 9, 6])
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=(), batch_size=4)
    single = Sampler.from_model(model).generate(prompts, cfg)
    multi = Sampler.from_model(sharded, mesh=mesh).generate(prompts, cfg)
    assert [c[0].token_ids for c in multi] == [c[0].token_ids for c in single]


def test_older_config_layout_translates_the_same(tmp_path):
    """transformers 4's config.json (rope_theta + rope_local_base_freq + rope_scaling, a
    sliding_window_pattern instead of layer_types) gives the same ModelConfig as 5's."""
    new = ModelConfig.from_hf_config(read_config(save_hf_model("gemma3_text", tmp_path / "g")))
    old = {k: v for k, v in read_config(tmp_path / "g").items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
               sliding_window_pattern=2)  # layers 0, 2 local; layer 1 global
    assert ModelConfig.from_hf_config(old) == new


@pytest.mark.parametrize("change,match", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_activation": "gelu"}, "hidden_act"),
    ({"model_type": "gemma3"}, "Gemma3ForCausalLM"),
])
def test_unsupported_options_are_refused(change, match):
    hf = {**FAMILIES["gemma3_text"], **change}
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf_config(hf)


def test_model_json_round_trips_the_gemma_switches():
    """A dcd-jax model dir's model.json (to_dict -> JSON -> from_dict) keeps every Gemma switch:
    the per-layer local flags, the local RoPE, the window; Gemma 3 1B's public facts."""
    import json
    from pathlib import Path

    from dcd_jax.config import from_dict, to_dict

    arch = Path(__file__).resolve().parents[1] / "configs" / "architectures" / "google--gemma-3-1b-it.json"
    cfg = ModelConfig.from_hf_config(json.loads(arch.read_text()))
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert cfg.sliding_window == 512 and sum(cfg.local_layers) == 22 and not cfg.local_layers[5]
    assert (cfg.rope.theta, cfg.rope_local.theta) == (1e6, 1e4) and cfg.attention_scale == 256 ** -0.5
    assert round(cfg.num_params / 1e6) == 1000  # "1B": 999.9M with the tied 262144 x 1152 embedding


# --------------------------------------------------------------------------- chat template, BOS, EOS ids
# A Gemma-like tokenizer built here (tests/hf_fixtures.save_gemma_tokenizer): Gemma 3's chat template,
# <bos> added by add_special_tokens=True (as Gemma's), <eos> as its EOS and generation_config.json
# listing <eos> and <end_of_turn> (as Gemma 3's does).

PROMPT = "Ivy has 23 cookies. She eats 3. How many cookies does Ivy have now?"
RESPONSE = "23 - 3 = 20.\nThe answer is 20."


def _gemma_tokenizer(d, chat):
    from transformers import AutoTokenizer

    from hf_fixtures import GEMMA_BOS, GEMMA_EOS, GEMMA_END_OF_TURN, GEMMA_PAD, save_gemma_tokenizer

    save_gemma_tokenizer(d, chat=chat)
    ids = dict(bos_token_id=GEMMA_BOS, eos_token_id=[GEMMA_EOS, GEMMA_END_OF_TURN], pad_token_id=GEMMA_PAD)
    (d / "generation_config.json").write_text(__import__("json").dumps(ids))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory):
    return _gemma_tokenizer(tmp_path_factory.mktemp("gemma_chat"), chat=True)


@pytest.fixture(scope="module")
def gemma_base_tok(tmp_path_factory):
    return _gemma_tokenizer(tmp_path_factory.mktemp("gemma_base"), chat=False)


def test_the_tokenizer_is_gemma_like(gemma_tok):
    from hf_fixtures import GEMMA_BOS, GEMMA_EOS, GEMMA_END_OF_TURN

    from dcd_jax.stop_tokens import stop_token_ids

    assert type(gemma_tok).__name__ == "GemmaTokenizer" and gemma_tok.eos_token_id == GEMMA_EOS
    assert gemma_tok("hi")["input_ids"][0] == GEMMA_BOS  # add_special_tokens=True adds the BOS, as Gemma's does
    assert stop_token_ids(gemma_tok) == (GEMMA_EOS, GEMMA_END_OF_TURN)


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_chat_masks_cover_exactly_the_responses_with_one_bos(gemma_tok, system_prompt):
    """The example's ids are transformers' rendering tokenized (one <bos>: the template's, none
    added); the loss covers each model turn's content and its <end_of_turn>, and nothing follows
    it (no <eos> appended after an <end_of_turn>: both end the turn)."""
    from hf_fixtures import GEMMA_BOS, GEMMA_END_OF_TURN

    from dcd_jax.data import DataConfig, render_prompt, tokenize_example

    cfg = DataConfig(system_prompt=system_prompt)
    chat = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "The answer is 20."},
            {"role": "user", "content": "She finds 4 more. How many now?"}, {"role": "assistant", "content": RESPONSE}]
    for record, turns in (({"prompt": PROMPT, "response": RESPONSE}, chat[:1] + chat[3:]), ({"messages": chat}, chat)):
        ex = tokenize_example(record, gemma_tok, cfg)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns
        rendered = gemma_tok.apply_chat_template(messages, tokenize=False)
        assert rendered.startswith("<bos><start_of_turn>user\n" + (f"{system_prompt}\n\n" if system_prompt else ""))
        want = gemma_tok(rendered.rstrip("\n"), add_special_tokens=False)["input_ids"]
        assert ex.input_ids.tolist() == want
        assert ex.input_ids.tolist().count(GEMMA_BOS) == 1 and ex.input_ids[0] == GEMMA_BOS
        assert ex.input_ids[-1] == GEMMA_END_OF_TURN and ex.response_mask[-1]
        answers = [m["content"] for m in turns if m["role"] == "assistant"]
        assert gemma_tok.decode(ex.input_ids[ex.response_mask]) == "<end_of_turn>".join(answers) + "<end_of_turn>"
        # What inference renders for the prompt is the training example's prefix up to the response.
        prompt = render_prompt(turns[:-1], gemma_tok, cfg)
        assert prompt.endswith("<start_of_turn>model\n")
        prompt_ids = gemma_tok(prompt, add_special_tokens=False)["input_ids"]
        assert ex.input_ids[: len(prompt_ids)].tolist() == prompt_ids and ex.response_mask[len(prompt_ids)]
        assert not ex.response_mask[len(prompt_ids) - 1]


def test_base_checkpoint_without_a_chat_template_renders_plain_text_after_bos(gemma_base_tok):
    from hf_fixtures import GEMMA_BOS, GEMMA_EOS

    from dcd_jax.data import DataConfig, render_prompt, tokenize_example

    assert not gemma_base_tok.chat_template
    ex = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, gemma_base_tok, DataConfig())
    text = gemma_base_tok.decode(ex.input_ids)
    assert text == f"<bos>### User:\n{PROMPT}\n\n### Assistant:\n{RESPONSE}<eos>"
    assert ex.input_ids.tolist().count(GEMMA_BOS) == 1 and ex.input_ids[0] == GEMMA_BOS
    assert ex.input_ids[-1] == GEMMA_EOS
    assert gemma_base_tok.decode(ex.input_ids[ex.response_mask]) == RESPONSE + "<eos>"
    prompt = render_prompt(PROMPT, gemma_base_tok, DataConfig())
    assert prompt == f"<bos>### User:\n{PROMPT}\n\n### Assistant:\n"
    assert gemma_base_tok(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[: ex.prompt_length].tolist()


def test_generation_stops_at_either_eos_id(tmp_path):
    """A model that repeats its last token (attention and MLP outputs zeroed, equal-norm embedding
    rows, so each token's own row wins the tied unembedding): after a prompt ending in <eos> or in
    <end_of_turn> it emits that token first, and the sampler's default stop ids (the tokenizer's
    EOS + generation_config.json's) end the row there; after a letter it runs to the budget."""
    import json

    from hf_fixtures import GEMMA_EOS, GEMMA_END_OF_TURN, save_gemma_checkpoint

    from transformers import AutoTokenizer

    from dcd_jax.infer.sampler import Sampler, SamplingConfig

    d = save_gemma_checkpoint(tmp_path / "g")
    model = dcd_jax.load_hf(d)
    graphdef, state = nnx.split(model)
    params = jax.tree.map(np.array, nnx.to_pure_dict(state))  # writable copies
    params["layers"]["attn"]["o_proj"]["kernel"][...] = 0
    params["layers"]["mlp"]["down_proj"]["kernel"][...] = 0
    params["final_norm"]["scale"][...] = 0  # (1 + w) = 1
    e = params["embed"]["embedding"]
    params["embed"]["embedding"] = e / np.linalg.norm(e, axis=-1, keepdims=True)

    tok = AutoTokenizer.from_pretrained(str(d))
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [GEMMA_EOS, GEMMA_END_OF_TURN]
    sampler = Sampler(graphdef, params, tok)
    a = tok.convert_tokens_to_ids("a")
    prompts = [tok("Hi", add_special_tokens=True)["input_ids"] + [t] for t in (GEMMA_EOS, GEMMA_END_OF_TURN, a)]
    out = [c[0] for c in sampler.generate(prompts, SamplingConfig(max_new_tokens=5, batch_size=4))]
    assert [(c.token_ids, c.finished_by) for c in out] == [
        ([GEMMA_EOS], "eos"), ([GEMMA_END_OF_TURN], "eos"), ([a] * 5, "length")]
    assert out[0].text == out[1].text == "" and out[2].text == "aaaaa"
