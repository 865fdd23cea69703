"""score-teacher: cached log-probs equal a direct forward pass; a killed run resumes to the same file."""

import dataclasses

import jax
import numpy as np
import pytest

from train_fixtures import make_assets

import dcd_jax
from dcd_jax.data import DataConfig, build_train_iterator, iter_examples
from dcd_jax.eval import scoring
from dcd_jax.eval.scoring import ScoreConfig, score_teacher


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("score_assets"), n_examples=40)


def test_scores_equal_a_direct_forward_pass(assets, tmp_path):
    from transformers import AutoTokenizer

    data = DataConfig(path=str(assets["train"]), seq_len=256, max_records=12)
    out = score_teacher(data, ScoreConfig(teacher=str(assets["student"]), out=str(tmp_path / "s.parquet"), topk=5,
                                          batch_size=4, chunk_examples=5, chunk_size=32), progress=False)
    tok = AutoTokenizer.from_pretrained(assets["student"])
    model = dcd_jax.load_hf(assets["student"])
    scored = dataclasses.replace(data, teacher_scores=str(out), topk=5)
    examples = list(iter_examples(scored, tok, apply_length=False))
    assert len(examples) == 12
    for ex in examples[:4]:
        logits = np.asarray(model(ex.input_ids[None]))[0]
        logp = np.asarray(jax.nn.log_softmax(logits[:, : model.cfg.true_vocab_size]))
        at = ex.response_positions - 1
        np.testing.assert_allclose(ex.teacher.logprobs, logp[at, ex.input_ids[at + 1]], atol=1e-5)
        top = np.argsort(-logp[at], axis=-1)[:, :5]
        np.testing.assert_array_equal(ex.teacher.topk_ids, top)
        np.testing.assert_allclose(ex.teacher.topk_logprobs, np.take_along_axis(logp[at], top, -1), atol=1e-5)
    # The training batches carry them at the target positions of the response tokens.
    batch = next(build_train_iterator(dataclasses.replace(scored, batch_size=2, shuffle=False, packing=False), tok))
    mask = batch["loss_mask"] > 0
    first = examples[0]
    n = first.num_tokens
    np.testing.assert_allclose(batch["teacher_logprobs"][0, :n][mask[0, :n]], first.teacher.logprobs, atol=0)


def test_killed_scoring_resumes_to_the_same_file(assets, tmp_path, monkeypatch):
    data = DataConfig(path=str(assets["train"]), seq_len=256, max_records=20)
    cfg = ScoreConfig(teacher=str(assets["student"]), topk=3, batch_size=4, chunk_examples=4, chunk_size=32)
    straight = score_teacher(data, dataclasses.replace(cfg, out=str(tmp_path / "a" / "s.parquet")), progress=False)

    written = []
    real_write = scoring._atomic_write

    def dying_write(path, rows, fingerprint):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # the process dies after two finished parts
        real_write(path, rows, fingerprint)
        written.append(path)

    monkeypatch.setattr(scoring, "_atomic_write", dying_write)
    target = tmp_path / "b" / "s.parquet"
    with pytest.raises(KeyboardInterrupt):
        score_teacher(data, dataclasses.replace(cfg, out=str(target)), progress=False)
    assert not target.exists() and len(list(target.parent.glob("s.parquet.parts/*.parquet"))) == 2
    monkeypatch.setattr(scoring, "_atomic_write", real_write)
    resumed = score_teacher(data, dataclasses.replace(cfg, out=str(target)), progress=False)
    assert resumed.read_bytes() == straight.read_bytes()
    assert not (tmp_path / "b" / "s.parquet.parts").exists()
