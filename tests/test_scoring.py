"""score-teacher: cached log-probs equal a direct forward pass; a killed run resumes to the same file."""

import dataclasses

import jax
import numpy as np
import pytest

from train_fixtures import make_assets

import dcd_jax
from dcd_jax.data import DataConfig, DataError, build_train_iterator, iter_examples
from dcd_jax.teacher import scoring
from dcd_jax.teacher.scoring import ScoreConfig, score_teacher


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

    def dying_write(path, rows, provenance):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # the process dies after two finished parts
        real_write(path, rows, provenance)
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


def test_resume_refuses_parts_of_edited_traces_or_another_topk(assets, tmp_path, monkeypatch):
    import json

    traces = tmp_path / "train.jsonl"
    lines = open(assets["train"]).read().splitlines()[:8]
    traces.write_text("\n".join(lines) + "\n")
    data = DataConfig(path=str(traces), seq_len=256)
    cfg = ScoreConfig(teacher=str(assets["student"]), out=str(tmp_path / "s.parquet"), topk=3, batch_size=4,
                      chunk_examples=4, chunk_size=32)
    real_write = scoring._atomic_write

    def dying_write(path, rows, provenance):
        real_write(path, rows, provenance)
        raise KeyboardInterrupt("killed after the first part")

    monkeypatch.setattr(scoring, "_atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        score_teacher(data, cfg, progress=False)
    monkeypatch.setattr(scoring, "_atomic_write", real_write)
    with pytest.raises(DataError, match=r"field 'teacher': part .* was scored differently \(now vs then: topk 2 != 3\); "
                       r"rescore: delete .*s.parquet.parts and rerun"):
        score_teacher(data, dataclasses.replace(cfg, topk=2), progress=False)
    edited = json.loads(lines[2])
    edited["response"] = edited["response"].replace("The answer is", "So the answer is")
    traces.write_text("\n".join(lines[:2] + [json.dumps(edited)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"^{traces}:3: field 'content_hash': the traces changed since part "
                       r"\S+ was scored \(row 2: then id"):
        score_teacher(data, cfg, progress=False)


def test_weights_fingerprint_is_exact_and_mesh_independent(assets):
    from dcd_jax.convert.model_dir import load_pretrained
    from dcd_jax.teacher.scoring import weights_fingerprint
    from dcd_jax.sharding import make_mesh

    params = load_pretrained(str(assets["student"])).params
    sharded = load_pretrained(str(assets["student"]), mesh=make_mesh(data=1, fsdp=-1, tensor=1)).params
    assert jax.tree.leaves(sharded)[0].sharding.num_devices == 8
    fp = weights_fingerprint(params)
    assert fp.startswith("w-") and weights_fingerprint(sharded) == fp
    leaves, treedef = jax.tree.flatten(params)
    leaves[0] = np.asarray(leaves[0]).copy()
    leaves[0].reshape(-1)[7] = np.nextafter(leaves[0].reshape(-1)[7], np.float32(np.inf))  # one ulp
    assert weights_fingerprint(jax.tree.unflatten(treedef, leaves)) != fp
