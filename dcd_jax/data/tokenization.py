"""Records -> token ids plus a mask of the tokens the student learns (the assistant turns).

Rendering. With a chat template (the student tokenizer's, ``data.template: auto``) the whole
conversation is rendered once by ``tokenizer.apply_chat_template`` and tokenized once, so the ids
are exactly what transformers produces. The characters of assistant turn ``i`` are those between
the rendering of ``messages[:i]`` with the generation prompt and the rendering of
``messages[:i+1]`` (trailing whitespace after the turn excluded), i.e. the turn's content and its
end-of-turn token - what the model must emit after the generation prompt. A token belongs to the
response if its first character lies in such a span. Text the template adds after the last turn
is cut, and the tokenizer's EOS is appended unless the response already ends with a stop id
(:func:`dcd_jax.stop_tokens.stop_token_ids`: the EOS, or an eos id of the model's
``generation_config.json`` such as Gemma's ``<end_of_turn>``, which generation stops at as well).
The BOS is the template's (the rendered text is tokenized without special tokens), so it appears
once.

Without a chat template (or ``data.template: plain``) the plain template is::

    <bos>{system}\\n\\n### User:\\n{prompt}\\n\\n### Assistant:\\n{response}<eos>

(``<bos>`` only if the tokenizer has one; multi-turn chats repeat the user/assistant blocks,
separated by a blank line).

Lengths are left alone here: :func:`fit_to_length` applies ``data.seq_len`` and ``truncation``.
Teacher scoring uses the untruncated tokenization, so scores stay valid for any ``seq_len``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from dcd_jax.data.config import DataConfig
from dcd_jax.data.errors import DataError, Location
from dcd_jax.data.records import Message, Record, parse_record
from dcd_jax.data.teacher_scores import TeacherScores, tokenizer_fingerprint
from dcd_jax.stop_tokens import stop_token_ids

PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### User:\n{content}\n\n"
PLAIN_ASSISTANT = "### Assistant:\n"
PLAIN_TURN_END = "\n\n"


class PromptStyle(Protocol):
    """How prompts are rendered: :class:`DataConfig` in training; the eval and generate configs
    carry the same two fields, so a prompt is rendered at inference exactly as in training."""

    template: str  # auto | plain (| raw: the text as is, inference only)
    system_prompt: str | None


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One tokenized trace.

    ``response_mask[i]`` is true iff token ``i`` is part of an assistant turn and hence a target of
    the loss (as the target of position ``i - 1``); position 0 is never a response token.
    ``teacher`` (when stored scores are used) is aligned with the response tokens in order.
    """

    id: str
    location: Location
    input_ids: np.ndarray  # int32 [L]
    response_mask: np.ndarray  # bool [L]
    answer: str | None = None
    truncated: bool = False
    teacher: TeacherScores | None = None
    prompt_field: str = "prompt"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def response_positions(self) -> np.ndarray:
        """Indices of the response tokens (what stored teacher scores are aligned with)."""
        return np.flatnonzero(self.response_mask)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first response token."""
        return int(np.argmax(self.response_mask))

    def features(self, topk: int = 0) -> dict[str, np.ndarray]:
        """Per-token training arrays of this example, shifted so that position ``t`` predicts ``t+1``.

        ``targets``/``loss_mask`` end with 0 (the last token predicts nothing); teacher arrays are
        filled at the target positions of the response tokens and 0 elsewhere.
        """
        n = self.num_tokens
        targets = np.zeros(n, np.int32)
        targets[:-1] = self.input_ids[1:]
        loss_mask = np.zeros(n, np.float32)
        loss_mask[:-1] = self.response_mask[1:]
        out = {"input_ids": self.input_ids.astype(np.int32), "targets": targets, "loss_mask": loss_mask}
        if self.teacher is not None:
            at = self.response_positions - 1
            logprobs = np.zeros(n, np.float32)
            logprobs[at] = self.teacher.logprobs
            out["teacher_logprobs"] = logprobs
            if topk:
                ids = np.zeros((n, topk), np.int32)
                lps = np.zeros((n, topk), np.float32)
                ids[at] = self.teacher.topk_ids
                lps[at] = self.teacher.topk_logprobs
                out["teacher_topk_ids"], out["teacher_topk_logprobs"] = ids, lps
        return out


# --------------------------------------------------------------------------- rendering


def uses_chat_template(tokenizer: Any, cfg: PromptStyle) -> bool:
    """Whether records are rendered with the tokenizer's chat template (else the plain template)."""
    return cfg.template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def _with_system(messages: Sequence[Message], cfg: PromptStyle) -> list[dict[str, str]]:
    out = [{"role": m.role, "content": m.content} for m in messages]
    if cfg.system_prompt is not None and (not out or out[0]["role"] != "system"):
        out.insert(0, {"role": "system", "content": cfg.system_prompt})
    return out


def _render_plain(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool) -> tuple[str, list]:
    text = tokenizer.bos_token or ""
    spans = []
    for m in messages:
        if m["role"] == "system":
            text += PLAIN_SYSTEM.format(content=m["content"])
        elif m["role"] == "user":
            text += PLAIN_USER.format(content=m["content"])
        else:
            text += PLAIN_ASSISTANT
            start = len(text)
            text += m["content"] + (tokenizer.eos_token or "")
            spans.append((start, len(text)))
            text += PLAIN_TURN_END
    if add_generation_prompt:
        text += PLAIN_ASSISTANT
    return text, spans


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, record: Record) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except ImportError:  # a missing library (jinja2) is not the record's fault
        raise
    except Exception as e:  # jinja raises TemplateError (e.g. raise_exception in the template)
        raise DataError(f"the chat template failed to render this conversation: {e}", location=record.location,
                        field=record.response_field, reason="template") from None


def render_example(record: Record, tokenizer: Any, cfg: DataConfig) -> tuple[str, list[tuple[int, int]]]:
    """Text of the conversation and the character spans of its assistant turns (see module doc)."""
    messages = _with_system(record.messages, cfg)
    if not uses_chat_template(tokenizer, cfg):
        text, spans = _render_plain(messages, tokenizer, add_generation_prompt=False)
        return text[: spans[-1][1]], spans
    full = _apply_template(tokenizer, messages, False, record)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], True, record)
        upto = full if i == len(messages) - 1 else _apply_template(tokenizer, messages[: i + 1], False, record)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"the chat template is not prefix-consistent at turn {i} (rendering the conversation up to a turn "
                "is not a prefix of rendering all of it, e.g. a template that rewrites earlier turns), so the "
                "assistant tokens cannot be located; use data.template=plain or a different template",
                location=record.location, field=record.response_field, reason="template",
            )
        spans.append((len(before), max(len(before), len(upto.rstrip()))))
    return full[: spans[-1][1]], spans


def render_prompt(prompt: str | Sequence[Message | Mapping[str, str]], tokenizer: Any, cfg: PromptStyle) -> str:
    """The text a model is given to write the next assistant turn, rendered as in training.

    ``prompt`` is a user message or a conversation (ending before the assistant turn to write).
    Tokenize the result with ``add_special_tokens=False``.
    """
    if isinstance(prompt, str):
        turns = [Message("user", prompt)]
    else:
        turns = [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt]
    messages = _with_system(turns, cfg)
    if uses_chat_template(tokenizer, cfg):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _render_plain(messages, tokenizer, add_generation_prompt=True)[0]


def render_prompts(prompts: Sequence[str], tokenizer: Any, style: PromptStyle) -> list[str]:
    """:func:`render_prompt` of each prompt; ``style.template == "raw"`` keeps the text as is."""
    if style.template == "raw":
        return list(prompts)
    return [render_prompt(p, tokenizer, style) for p in prompts]


# --------------------------------------------------------------------------- tokenization


def _build(record: Record, ids: Sequence[int], offsets: Sequence[Sequence[int]], spans: list, eos_id: int,
           stop_ids: Sequence[int] = ()) -> TokenizedExample:
    ids = np.asarray(ids, np.int32)
    starts = np.asarray(offsets, np.int64).reshape(-1, 2)[:, 0]
    mask = np.zeros(ids.shape[0], bool)
    for turn, (start, stop) in enumerate(spans):
        inside = (starts >= start) & (starts < stop)
        if not inside.any():
            raise DataError(
                f"assistant turn {turn} renders to no tokens (all-masked: the template drops its content?), "
                "so there is nothing to learn from it",
                location=record.location, field=record.response_field, reason="all_masked",
            )
        mask |= inside
    if ids.shape[0] == 0 or (ids[-1] != eos_id and ids[-1] not in stop_ids):
        ids = np.append(ids, np.int32(eos_id))
        mask = np.append(mask, True)
    mask[0] = False
    if not mask.any():
        raise DataError("no response token can be a target (all-masked)", location=record.location,
                        field=record.response_field, reason="all_masked")
    return TokenizedExample(
        id=record.id, location=record.location, input_ids=ids, response_mask=mask, answer=record.answer,
        prompt_field=record.prompt_field,
    )


def _encode(texts: list[str], tokenizer: Any) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of ``texts`` (no special tokens added).

    Fast tokenizers are called through their Rust backend directly: same ids as
    ``tokenizer(texts, add_special_tokens=False)``, without building Python offset lists twice.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    if "offset_mapping" not in enc:
        raise ValueError("a fast tokenizer (with offset mapping) is required to locate the response tokens")
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _from_tokens(record: Record, vocab_size: int, fingerprint: str, cfg: DataConfig) -> TokenizedExample:
    """A tokenized record's example: its ids as given, checked against the student tokenizer."""
    tokens = record.tokens
    if tokens.fingerprint != fingerprint:
        raise DataError(
            f"the token ids come from another tokenizer (fingerprint {tokens.fingerprint}) than the student's "
            f"({fingerprint}); retokenize the traces with the student tokenizer",
            location=record.location, field=cfg.teacher_fingerprint_field, reason="teacher_fingerprint")
    ids = tokens.input_ids
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise DataError(f"holds ids outside the student vocabulary [0, {vocab_size})", location=record.location,
                        field=record.prompt_field, reason="wrong_type")
    mask = tokens.response_mask.copy()
    mask[0] = False  # position 0 is never a target
    if not mask.any():
        raise DataError("no response token can be a target (all-masked)", location=record.location,
                        field=record.response_field, reason="all_masked")
    return TokenizedExample(id=record.id, location=record.location, input_ids=ids.astype(np.int32, copy=False),
                            response_mask=mask, answer=record.answer, prompt_field=record.prompt_field)


def tokenize_records(
    records: Sequence[Record], tokenizer: Any, cfg: DataConfig, *, fingerprint: str | None = None
) -> list[TokenizedExample | DataError]:
    """Tokenize many records in one tokenizer call; a record that fails gives its :class:`DataError`.

    Needs a fast (Rust) tokenizer: the mask comes from its character offsets. Tokenized records
    (:class:`~dcd_jax.data.records.RecordTokens`) are taken as they are, once their fingerprint is
    checked against ``fingerprint`` (the student tokenizer's; computed here when not given).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the student tokenizer has no eos_token; it is needed to end every response")
    stop_ids = stop_token_ids(tokenizer)
    results: list[TokenizedExample | DataError | None] = [None] * len(records)
    rendered = []
    for i, record in enumerate(records):
        try:
            if record.tokens is not None:
                fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
                results[i] = _from_tokens(record, len(tokenizer), fingerprint, cfg)
                continue
            rendered.append((i, *render_example(record, tokenizer, cfg)))
        except DataError as e:
            results[i] = e
    if rendered:
        for (i, _, spans), (ids, offsets) in zip(rendered, _encode([text for _, text, _ in rendered], tokenizer)):
            try:
                results[i] = _build(records[i], ids, offsets, spans, eos_id, stop_ids)
            except DataError as e:
                results[i] = e
    return results  # type: ignore[return-value]


def tokenize_example(record: Record | Mapping[str, Any], tokenizer: Any, cfg: DataConfig) -> TokenizedExample:
    """Tokenize one record (a :class:`Record` or a raw dict in the configured field names).

    Returns the full, untruncated example; ``response_positions`` are the tokens stored teacher
    scores must be aligned with. Raises :class:`DataError` for an invalid record.
    """
    if not isinstance(record, Record):
        record = parse_record(record, 0, Location("<record>", index=0), cfg)
    result = tokenize_records([record], tokenizer, cfg)[0]
    if isinstance(result, DataError):
        raise result
    return result


def fit_to_length(example: TokenizedExample, cfg: DataConfig) -> TokenizedExample | None:
    """Apply ``seq_len``: the example itself, its truncation, or ``None`` when it is dropped.

    Raises :class:`DataError` (reason ``prompt_too_long``) when not even the first response token
    fits: the prompt alone fills ``seq_len``.
    """
    if example.num_tokens <= cfg.seq_len:
        return example
    if example.prompt_length >= cfg.seq_len:
        raise DataError(
            f"the prompt is {example.prompt_length} tokens, which leaves no room for the response within "
            f"seq_len={cfg.seq_len}",
            location=example.location, field=example.prompt_field, reason="prompt_too_long",
        )
    if cfg.truncation == "drop":
        return None
    mask = example.response_mask[: cfg.seq_len]
    teacher = None if example.teacher is None else example.teacher.head(int(mask.sum()))
    return dataclasses.replace(
        example, input_ids=example.input_ids[: cfg.seq_len], response_mask=mask, truncated=True, teacher=teacher
    )
