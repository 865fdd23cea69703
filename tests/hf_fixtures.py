"""Tiny random Hugging Face checkpoints built locally with transformers (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 96

FAMILIES = {
    # GQA + Llama-3 rope scaling (original context 16, so test sequences cross the scaled band).
    "llama": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    # q/k/v biases + tied embeddings.
    "qwen2": dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
    ),
    # per-head q/k RMSNorm + head_dim (20) != hidden/heads (12).
    "qwen3": dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=20, rope_theta=1000000.0,
    ),
    # Gemma 3 text: GeGLU, (1 + w) norms, 4 norms per layer, q/k norms, scaled embedding, attention
    # scale 12^-0.5 (not head_dim's), tied embeddings; sliding window 4 (test rows run far past
    # it) on layers 0 and 2, a global layer 1 with linear rope scaling; GQA.
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=128,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
}


def make_hf_model(family: str, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**FAMILIES[family], **overrides}
    config = AutoConfig.for_model(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the default init, so parity tests see real signal
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def save_hf_model(family: str, out_dir: Path, *, max_shard_size: str | None = None, dtype=None, **overrides) -> Path:
    model = make_hf_model(family, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)


def save_word_tokenizer(out_dir: Path, n_tokens: int) -> None:
    """A word-level tokenizer with ``n_tokens`` entries (fewer than the embedding rows, like Qwen)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(out_dir)


# Gemma 3's chat template (text part): BOS, user/model turns each closed by <end_of_turn> and a newline,
# a system message folded into the first user turn.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""
# Gemma's special ids (<pad> 0, <eos> 1, <bos> 2 as in Gemma 3; <end_of_turn> 6 here, 106 there).
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_END_OF_TURN = 0, 1, 2, 6
GEMMA_VOCAB = 128  # embedding rows; the tokenizer has 103 entries


def save_gemma_tokenizer(out_dir: Path, *, chat: bool = True):
    """A character-level ``GemmaTokenizer`` (the class transformers assigns to gemma3_text: BPE with
    byte fallback, spaces as "▁", a BOS added by ``add_special_tokens=True``) with Gemma's special
    tokens and, when ``chat``, Gemma 3's chat template; a base checkpoint's has none."""
    import string

    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    chars = ["▁", "\n"] + [c for c in string.printable if c not in " \n\t\r\x0b\x0c"]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(GEMMA_SPECIALS + chars)}, merges=[], add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in GEMMA_SPECIALS[5:]]})
    if chat:
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def save_gemma_checkpoint(out_dir: Path, *, chat: bool = True, **overrides) -> Path:
    """A tiny random Gemma 3 text checkpoint (tests/hf_fixtures' gemma3_text, 128 embedding rows)
    with :func:`save_gemma_tokenizer` and Gemma 3's generation config: both <eos> and <end_of_turn>
    end a turn."""
    ids = dict(bos_token_id=GEMMA_BOS, eos_token_id=[GEMMA_EOS, GEMMA_END_OF_TURN], pad_token_id=GEMMA_PAD)
    save_hf_model("gemma3_text", out_dir, vocab_size=GEMMA_VOCAB, **ids, **overrides)
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(ids, indent=2))
    save_gemma_tokenizer(out_dir, chat=chat)
    return Path(out_dir)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(input_ids), **kwargs).logits.float().numpy()


def read_config(d: Path) -> dict:
    return json.loads((Path(d) / "config.json").read_text())
