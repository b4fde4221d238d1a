"""Dataset readers: every format, labelled and not, and the bad inputs users send."""

from __future__ import annotations

import io
import json
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from worker.compression.errors import DatasetError, SpecError
from worker.compression.io.datasets import DataLimits, load_dataset, train_eval_split
from worker.compression.spec import DataSpec
from worker.compression.types import TensorData

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "great", "plot", "the"]
UNPICKLED: list[str] = []


def _mark_unpickled() -> list[str]:
    UNPICKLED.append("ran")
    return UNPICKLED


class _Payload:
    """Unpickling this calls `_mark_unpickled`: proof that a loader ran pickle."""

    def __reduce__(self):
        return (_mark_unpickled, ())


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(folder, local_files_only=True)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# --- arrays -------------------------------------------------------------------------------

def test_npz_labelled_vectors(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 5))
    y = np.array([0, 1, 2] * 4)
    data = load_dataset(_npz(tmp_path / "d.npz", x=x, y=y))
    assert data.input_kind == "vector"
    assert data.inputs["x"].dtype == torch.float32 and data.inputs["x"].shape == (12, 5)
    assert torch.allclose(data.inputs["x"], torch.from_numpy(x).float())
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    assert data.classes == ["0", "1", "2"]
    assert data.summary()["format"] == "npz" and data.summary()["num_classes"] == 3


def test_npz_unlabelled_signal(tmp_path):
    data = load_dataset(_npz(tmp_path / "d.npz", x=np.zeros((4, 2, 16), np.float32)))
    assert data.input_kind == "signal" and not data.labelled and data.classes is None


def test_npz_targets_follow_the_task(tmp_path):
    x = np.zeros((4, 3), np.float32)
    reg = load_dataset(_npz(tmp_path / "r.npz", x=x, y=np.array([0.5, 1.0, 2.0, 3.5])), task="regression")
    assert reg.y.dtype == torch.float32 and reg.classes is None and reg.y.tolist() == [0.5, 1.0, 2.0, 3.5]
    as_float_classes = load_dataset(_npz(tmp_path / "c.npz", x=x, y=np.array([0.0, 1.0, 1.0, 0.0])),
                                    task="classification")
    assert as_float_classes.y.dtype == torch.int64 and as_float_classes.classes == ["0", "1"]
    emb = load_dataset(_npz(tmp_path / "e.npz", x=x, y=np.ones((4, 6))), task="embedding")
    assert emb.y.shape == (4, 6) and emb.y.dtype == torch.float32
    with pytest.raises(DatasetError, match="class indices"):
        load_dataset(tmp_path / "e.npz", task="classification")


def test_safetensors_and_truncated(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.rand(6, 1, 4, 4, dtype=torch.float16), "y": torch.tensor([1, 0, 1, 0, 1, 1])}, path)
    data = load_dataset(path)
    assert data.input_kind == "image" and data.inputs["x"].dtype == torch.float32
    assert data.classes == ["0", "1"] and data.y.tolist() == [1, 0, 1, 0, 1, 1]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="safetensors"):
        load_dataset(cut)


def test_digits_vectors_reshape_to_the_teacher_input(tmp_path):
    path = _npz(tmp_path / "digits.npz", x=np.arange(3 * 64, dtype=np.float64).reshape(3, 64), y=[1, 2, 3])
    data = load_dataset(path, input_shape=(1, 8, 8), input_kind="image")
    assert data.inputs["x"].shape == (3, 1, 8, 8) and data.input_kind == "image"
    assert data.inputs["x"][1, 0, 0, :3].tolist() == [64.0, 65.0, 66.0]
    with pytest.raises(DatasetError, match=r"\(64,\) \(64 values\) but the teacher expects \(1, 28, 28\)"):
        load_dataset(path, input_shape=(1, 28, 28))


def test_token_ids_from_npz(tmp_path):
    ids = np.array([[2, 5, 3, 0], [2, 6, 7, 3]])
    path = _npz(tmp_path / "t.npz", input_ids=ids, y=[0, 1])
    data = load_dataset(path, input_kind="tokens", input_shape=(8,))
    assert data.input_kind == "tokens" and data.inputs["input_ids"].tolist() == ids.tolist()
    assert data.inputs["attention_mask"].tolist() == [[1] * 4] * 2
    with pytest.raises(DatasetError, match="integer token ids"):
        load_dataset(_npz(tmp_path / "f.npz", x=ids.astype(np.float32)), input_kind="tokens")
    with pytest.raises(DatasetError, match="at most 3 tokens"):
        load_dataset(path, input_kind="tokens", input_shape=(3,))


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    payload = np.empty(2, dtype=object)
    payload[:] = [_Payload(), _Payload()]
    path = tmp_path / "evil.npz"
    np.savez(path, x=payload)  # savez pickles object arrays
    with pytest.raises(DatasetError, match="allow_pickle"):
        load_dataset(path)
    assert UNPICKLED == []


def test_npz_bad_arrays(tmp_path):
    with pytest.raises(DatasetError, match=r"no array 'x' \(arrays present: features, y\)"):
        load_dataset(_npz(tmp_path / "a.npz", features=np.zeros((2, 2)), y=[0, 1]))
    with pytest.raises(DatasetError, match="x has 3 rows but y has 2"):
        load_dataset(_npz(tmp_path / "b.npz", x=np.zeros((3, 2)), y=[0, 1]))
    x = np.zeros((5, 2))
    x[3, 1] = np.nan
    with pytest.raises(DatasetError, match=r"x\[3\] has a NaN") as err:
        load_dataset(_npz(tmp_path / "c.npz", x=x))
    assert err.value.row == 3
    with pytest.raises(DatasetError, match="take 80,128 bytes decoded"):
        load_dataset(_npz(tmp_path / "d.npz", x=np.zeros((100, 100))),
                     limits=DataLimits(max_array_bytes=1000))
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not an .npz"):
        load_dataset(tmp_path / "e.npz")


def test_unknown_extension(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"accepted: \.npz"):
        load_dataset(tmp_path / "d.xlsx")


# --- tables -------------------------------------------------------------------------------

def test_csv_string_labels_become_sorted_classes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,dog\n3,4.5,cat\n5,6,dog\n")
    data = load_dataset(path)
    assert data.input_kind == "vector" and data.inputs["x"].tolist() == [[1, 2], [3, 4.5], [5, 6]]
    assert data.classes == ["cat", "dog"] and data.y.tolist() == [1, 0, 1]
    assert data.meta["columns"] == ["a", "b"] and data.meta["label_column"] == "label"


def test_csv_unlabelled_and_named_label(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n1,2,3\n4,5,6\n")
    assert not load_dataset(path).labelled
    data = load_dataset(path, DataSpec(label_column="c"), task="regression")
    assert data.inputs["x"].shape == (2, 2) and data.y.dtype == torch.float32 and data.y.tolist() == [3, 6]
    with pytest.raises(DatasetError, match="no label column 'species'; columns: a, b, c"):
        load_dataset(path, DataSpec(label_column="species"))


def test_csv_bad_cell_names_its_line_and_column(tmp_path):
    path = tmp_path / "d.csv"
    # the quoted label spans two lines, so line numbers are not simply index + 2
    path.write_text('a,b,label\n1,2,"two\nlines"\n\n3,4,x\n5,oops,y\n')
    with pytest.raises(DatasetError, match=r"^row 6: column 'b': 'oops' is not a finite number") as err:
        load_dataset(path)
    assert err.value.row == 6
    path.write_text("a,b\n1,2\n3,\n")
    with pytest.raises(DatasetError, match=r"^row 3: column 'b': missing value"):
        load_dataset(path)


def test_csv_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("a,label\n1,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"not UTF-8 text: byte 0xe9 at offset 13 \(line 2\)"):
        load_dataset(path)


def test_parquet_labelled_and_bad_row(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"f1": [0.1, 0.2, 0.3], "f2": [1, 2, 3], "target": [2, 0, 1]}).to_parquet(path)
    data = load_dataset(path, task="classification")
    assert data.inputs["x"].shape == (3, 2) and data.y.tolist() == [2, 0, 1]
    assert data.classes == ["0", "1", "2"]
    pd.DataFrame({"f1": [0.1, None, 0.3]}).to_parquet(path)
    with pytest.raises(DatasetError, match=r"^row 2: column 'f1': missing value"):
        load_dataset(path)


# --- text ---------------------------------------------------------------------------------

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_text_pairs_and_labels(tmp_path, tokenizer):
    rows = [{"text": "good movie", "text_pair": "great plot", "label": "pos"},
            {"text": "bad movie", "text_pair": "the plot", "label": "neg"}]
    data = load_dataset(_jsonl(tmp_path / "d.jsonl", rows), tokenizer=tokenizer, input_kind="tokens")
    assert data.input_kind == "tokens" and data.texts == ["good movie", "bad movie"]
    assert data.classes == ["neg", "pos"] and data.y.tolist() == [1, 0]
    ids = data.inputs["input_ids"]
    assert ids[0].tolist() == [2, 5, 7, 3, 8, 9, 3]  # [CLS] good movie [SEP] great plot [SEP]
    assert data.inputs["attention_mask"].shape == ids.shape


def test_jsonl_unlabelled_truncates_to_max_length(tmp_path, tokenizer):
    rows = [{"text": "good movie great plot"}, {"text": "bad"}]
    data = load_dataset(_jsonl(tmp_path / "d.jsonl", rows), DataSpec(max_length=8), tokenizer=tokenizer,
                        input_shape=(4,))
    assert not data.labelled and data.inputs["input_ids"].shape == (2, 4)
    assert data.inputs["attention_mask"][1].tolist() == [1, 1, 1, 0]


def test_text_csv_is_detected(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood movie,1\nbad movie,0\n")
    data = load_dataset(path, tokenizer=tokenizer)
    assert data.input_kind == "tokens" and data.meta["format"] == "text_csv"
    assert data.classes == ["0", "1"] and data.y.tolist() == [1, 0]


def test_text_errors_name_the_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good"}\n\n{"text": "bad",}\n')
    with pytest.raises(DatasetError, match=r"^row 3: not valid JSON") as err:
        load_dataset(path, tokenizer=tokenizer)
    assert err.value.row == 3
    path.write_text('{"text": "good"}\n{"text": "  "}\n')
    with pytest.raises(DatasetError, match=r"^row 2: column 'text': empty text"):
        load_dataset(path, tokenizer=tokenizer)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\ngood,1\n,0\n")
    with pytest.raises(DatasetError, match=r"^row 3: column 'text': empty text"):
        load_dataset(csv_path, tokenizer=tokenizer)
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad"}\n')
    with pytest.raises(DatasetError, match=r"^row 2: column 'label': missing label"):
        load_dataset(path, tokenizer=tokenizer)


def test_text_needs_a_tokenizer_unless_structure_only(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 0}, {"text": "bad", "label": 1}])
    with pytest.raises(DatasetError, match="needs a teacher with a tokenizer"):
        load_dataset(path)
    data = load_dataset(path, structure_only=True)
    assert len(data) == 2 and data.classes == ["0", "1"] and data.summary()["tokenized"] is False


# --- images -------------------------------------------------------------------------------

def _image_bytes(color: int, fmt: str, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (color, color, color)).save(buf, format=fmt)
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16  # a regular file, as zip tools write it
            zf.writestr(info, payload)
    return path


def test_image_zip_png_and_jpeg_class_folders(tmp_path):
    path = _zip(tmp_path / "imgs.zip", {
        "data/cats/a.png": _image_bytes(255, "PNG"),
        "data/cats/b.jpg": _image_bytes(255, "JPEG"),
        "data/dogs/c.PNG": _image_bytes(0, "PNG"),
        "data/dogs/d.jpeg": _image_bytes(0, "JPEG"),
        "data/.DS_Store": b"junk",
    })
    data = load_dataset(path)
    assert data.input_kind == "image" and data.classes == ["cats", "dogs"] and data.y.tolist() == [0, 0, 1, 1]
    assert data.inputs["x"].shape == (4, 3, 4, 6)  # the first image's size, RGB
    assert torch.allclose(data.inputs["x"][0], torch.ones(3, 4, 6))  # white → 1 (auto decodes to [0, 1])
    assert torch.allclose(data.inputs["x"][2], torch.zeros(3, 4, 6)) and data.meta["image_scale"] == "0-1"
    signed = load_dataset(path, DataSpec(image_scale="-1-1"))  # (1 - 0.5) / 0.5 and (0 - 0.5) / 0.5
    assert torch.allclose(signed.inputs["x"][2], -torch.ones(3, 4, 6)) and signed.inputs["x"][0].min() == 1
    assert torch.allclose(data.inputs["x"][1], torch.ones(3, 4, 6), atol=0.05)  # JPEG is lossy
    gray = load_dataset(path, input_shape=(1, 8, 8), input_kind="image")
    assert gray.inputs["x"].shape == (4, 1, 8, 8)
    custom = load_dataset(path, DataSpec(image_size=(2, 2), image_mean=[0.0], image_std=[1.0]))
    assert custom.inputs["x"].shape == (4, 3, 2, 2)
    assert torch.allclose(custom.inputs["x"][0], torch.ones(3, 2, 2))
    with pytest.raises(DatasetError, match=r"\(3, 4, 6\) .* teacher expects \(3, 8, 8\)"):
        load_dataset(path, DataSpec(image_size=(4, 6)), input_shape=(3, 8, 8))
    with pytest.raises(SpecError, match="image_mean has 2 values"):
        load_dataset(path, DataSpec(image_mean=[0.1, 0.2]))


def test_image_zip_bad_layouts(tmp_path):
    good = _image_bytes(10, "PNG")
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(_zip(tmp_path / "a.zip", {"README.txt": b"hi"}))
    with pytest.raises(DatasetError, match="a.png is not inside a class folder"):
        load_dataset(_zip(tmp_path / "b.zip", {"a.png": good, "cls/b.png": good}))
    with pytest.raises(DatasetError, match=r"cls/x\.gif: unsupported file type"):
        load_dataset(_zip(tmp_path / "c.zip", {"cls/a.png": good, "cls/x.gif": b"GIF89a"}))
    with pytest.raises(DatasetError, match=r"'\.\./evil\.png' escapes its folder"):
        load_dataset(_zip(tmp_path / "d.zip", {"cls/a.png": good, "../evil.png": good}))
    assert not (tmp_path / "evil.png").exists()


def test_corrupt_image_names_the_member(tmp_path):
    truncated = _image_bytes(10, "PNG", size=(40, 40))[:60]
    path = _zip(tmp_path / "d.zip", {"a/ok.png": _image_bytes(10, "PNG"), "b/broken.png": truncated})
    with pytest.raises(DatasetError, match=r"image b/broken\.png is corrupt"):
        load_dataset(path)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height``."""
    png = bytearray(_image_bytes(0, "PNG", size=(1, 1)))
    ihdr = 8  # IHDR chunk: length(4) type(4) data(13) crc(4), right after the signature
    png[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    png[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(png[ihdr + 4:ihdr + 21])))
    return bytes(png)


def test_image_bombs_are_refused_before_decoding(tmp_path):
    ok = _image_bytes(10, "PNG")
    path = _zip(tmp_path / "bomb.zip", {"a/ok.png": ok, "b/bomb.png": _png_claiming(20000, 20000)})
    with pytest.raises(DatasetError, match=r"image b/bomb\.png"):
        load_dataset(path, DataSpec(image_size=(4, 4)))
    path = _zip(tmp_path / "big.zip", {"a/ok.png": ok, "b/big.png": _png_claiming(3000, 3000)})
    with pytest.raises(DatasetError, match=r"b/big\.png is 3000x3000 pixels, over the limit of 1,000,000"):
        load_dataset(path, DataSpec(image_size=(4, 4)), limits=DataLimits(max_image_pixels=1_000_000))


# --- splits -------------------------------------------------------------------------------

def _vectors(n: int, features: int = 3, classes: list[str] | None = None) -> TensorData:
    y = torch.arange(n) % len(classes) if classes else None
    return TensorData({"x": torch.arange(n * features, dtype=torch.float32).reshape(n, features)}, y,
                      classes=classes)


def test_hold_out_split_is_seeded():
    data = _vectors(20, classes=["a", "b"])
    spec = DataSpec(eval_fraction=0.25, split_seed=7)
    (tr1, ev1), (tr2, ev2) = train_eval_split(data, None, spec), train_eval_split(data, None, spec)
    assert len(tr1) == 15 and len(ev1) == 5
    assert torch.equal(ev1.inputs["x"], ev2.inputs["x"]) and torch.equal(tr1.y, tr2.y)
    _, other = train_eval_split(data, None, DataSpec(eval_fraction=0.25, split_seed=8))
    assert not torch.equal(ev1.inputs["x"], other.inputs["x"])
    with pytest.raises(DatasetError, match="cannot hold out"):
        train_eval_split(_vectors(1), None, spec)


def test_eval_dataset_compatibility():
    train = _vectors(6, classes=["cat", "dog", "emu"])
    with pytest.raises(DatasetError, match=r"shape \(4,\) but training samples have \(3,\)"):
        train_eval_split(train, _vectors(4, features=4), DataSpec())
    with pytest.raises(DatasetError, match="classes the training data lacks: fox"):
        train_eval_split(train, _vectors(2, classes=["cat", "fox"]), DataSpec())
    _, ev = train_eval_split(train, _vectors(4, classes=["dog", "emu"]), DataSpec())
    assert ev.classes == ["cat", "dog", "emu"] and ev.y.tolist() == [1, 2, 1, 2]


def test_eval_tokens_are_padded_to_a_common_length():
    def tokens(n: int, length: int) -> TensorData:
        ids = torch.full((n, length), 5)
        return TensorData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, input_kind="tokens")

    train, ev = train_eval_split(tokens(3, 6), tokens(2, 4), DataSpec())
    assert train.inputs["input_ids"].shape == (3, 6) and ev.inputs["input_ids"].shape == (2, 6)
    assert ev.inputs["input_ids"][0].tolist() == [5, 5, 5, 5, 0, 0]
    assert ev.inputs["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
