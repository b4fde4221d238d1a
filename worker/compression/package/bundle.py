"""``bundle.zip``: the delivered ONNX model, ``preprocessing.json`` (every step from raw input to the
model's input, decided once by the job), the tokenizer for text, ``predict.py`` (an onnxruntime
script that predicts from image files, CSV rows or text) and ``MODEL_CARD.md``."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..types import Teacher, TensorData
from .model_card import model_card

PREDICT = Path(__file__).with_name("predict_script.py")
MODEL_NAME = "model.onnx"


def preprocessing(teacher: Teacher, data: TensorData, task: str, *, input_names: list[str], max_length: int,
                  text_column: str, student: dict[str, Any] | None, class_order: dict[str, Any] | None,
                  tokenizer_file: str | None) -> dict[str, Any]:  # fmt: skip
    """What raw inputs go through before the model, and what its outputs mean (``preprocessing.json``)."""
    sample_shape = list(next(iter(data.inputs.values())).shape[1:])
    out: dict[str, Any] = {
        "model": MODEL_NAME,
        "task": task,
        "input": {"names": input_names, "kind": data.input_kind, "shape": sample_shape},
    }
    if class_order is not None:
        out["classes"] = class_order["classes"]
        out["class_order"] = class_order["source"]
    if data.input_kind == "image":
        meta = data.meta
        out["image"] = {"channels": meta.get("channels", sample_shape[0]), "size": meta.get("image_size", sample_shape[1:]),
                        "scale": meta.get("image_scale", "custom"), "mean": meta.get("image_mean", [0.0]),
                        "std": meta.get("image_std", [1.0]),
                        "steps": "decode, convert to grayscale or RGB, resize (bilinear), divide by 255, "
                                 "subtract mean, divide by std, channels first"}  # fmt: skip
    meta = data.meta
    if meta.get("field") == "forecasting":  # a window of the series' last rows, not one row per sample
        channels, window = int(meta["channels"]), int(meta["window"])
        layout = ("channels_first" if sample_shape == [channels, window] else
                  "time_major" if sample_shape == [window, channels] else "flat_channels_first")
        out["forecast"] = {"columns": list(meta["columns"]), "target_columns": meta["target_columns"].split(","),
                           "time_column": meta.get("time_column") or None, "window": window,
                           "horizon": int(meta["horizon"]), "layout": layout,
                           "output": "step-major: value [h × targets + t] is target t at step h + 1"}
    elif data.input_kind == "signal" and meta.get("sample_rate") and meta.get("audio_length"):
        out["audio"] = {"sample_rate": int(meta["sample_rate"]), "length": int(meta["audio_length"]),
                        "steps": "decode (WAV / FLAC), mix to mono, resample by FFT, cut or pad with silence at "
                                 "the end; the model computes its own log-mel spectrogram"}
    elif data.input_kind == "vector" and data.meta.get("columns"):
        out["tabular"] = {"columns": list(data.meta["columns"]),
                          "label_column": data.meta.get("label_column") or None}
        if data.meta.get("categorical"):  # text cells to ids, as the job read them (`io.data_vocab`)
            out["tabular"]["categorical"] = [{k: v for k, v in vocab.items() if k != "distinct"}
                                             for vocab in data.meta["categorical"]]
            out["tabular"]["categorical_steps"] = (
                "a cell is its text as written (empty: \"\"); kind 'vocab': id i + 1 for tokens[i], else 0 "
                "(out of vocabulary); kind 'hash': zlib.crc32(utf-8 text) % buckets; the id goes at the "
                "column's place among the float features")
    if data.input_kind == "tokens":
        if teacher.input_shape and int(teacher.input_shape[0]) > 0:  # as the data was read: the model's limit
            max_length = min(max_length, int(teacher.input_shape[0]))
        out["text"] = {"tokenizer": tokenizer_file, "max_length": max_length, "column": text_column,
                       "pad_id": _pad_id(teacher)}
    if student:
        out["student"] = student
    if task == "regression":
        out["output"] = "values on the teacher's scale"
    return out


def _pad_id(teacher: Teacher) -> int:
    tok = teacher.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return int(pad) if isinstance(pad, int) else 0


def save_tokenizer(teacher: Teacher, folder: Path) -> str | None:
    """The teacher's tokenizer as ``tokenizer/tokenizer.json`` (the ``tokenizers`` format), or None."""
    tok = teacher.tokenizer
    if tok is None:
        return None
    target = folder / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.save(str(target / "tokenizer.json"))
    elif hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(target))
    return "tokenizer/tokenizer.json" if (target / "tokenizer.json").is_file() else None


def write_bundle(out_dir: Path, model: Path, teacher: Teacher, pre: dict[str, Any], card: dict[str, Any]) -> Path:
    """``bundle.zip`` in ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix="kdq-bundle-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(model, folder / MODEL_NAME)
        tokenizer = save_tokenizer(teacher, folder) if pre.get("text") else None
        if pre.get("text") is not None:
            pre["text"]["tokenizer"] = tokenizer
        (folder / "preprocessing.json").write_text(json.dumps(pre, indent=2) + "\n")
        shutil.copyfile(PREDICT, folder / "predict.py")
        (folder / "MODEL_CARD.md").write_text(model_card(**card, preprocessing=pre))
        archive = out_dir / "bundle.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(folder).as_posix())
    return archive


def bundle_job(out_dir: Path, model: Path, teacher: Teacher, data: TensorData, task: str, spec: dict[str, Any], *,
               input_names: list[str], student: dict[str, Any] | None, class_order: dict[str, Any] | None,
               report: dict[str, Any], inputs_sha256: dict[str, str]) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """``bundle.zip`` for the delivered ``model``; (its path, the preprocessing it records)."""
    pre = preprocessing(teacher, data, task, input_names=input_names, max_length=spec["data"]["max_length"],
                        text_column=spec["data"]["text_column"], student=student, class_order=class_order,
                        tokenizer_file=None)  # fmt: skip
    delivery = report["delivery"]
    card = {"verdict": delivery, "table": report["models"], "metric": delivery["metric"], "batch": delivery["batch"],
            "inputs": inputs_sha256, "spec": spec, "data": report["data"]}  # fmt: skip
    return write_bundle(out_dir, model, teacher, pre, card), pre
