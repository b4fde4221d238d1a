#!/usr/bin/env python3
"""Predict with the compressed model in this folder (a kdq bundle), from raw inputs.

    pip install onnxruntime numpy        # and pillow for images, tokenizers for text
    python predict.py digits/*.png       # image files
    python predict.py rows.csv           # tabular rows: the feature columns, by name (categories as text);
                                         # a model trained on arrays (.npz): rows of numbers, header optional
    python predict.py series.csv         # a forecaster: the next steps after the series' last window
    python predict.py clips/*.wav        # audio (pip install soundfile)
    python predict.py --text "a sentence" [--text "another"]
    python predict.py texts.jsonl        # one {"text": ...} per line
    python predict.py data.npz           # an array x, already preprocessed as the teacher took it

One JSON line per input on stdout: the class (with its probability) for a classifier, the values for
a regressor, the vector for an embedding model, each word's tag and the entities for a token
classifier (NER; a .jsonl line may also give pre-split ``tokens``). As a library: ``Bundle(folder).predict_files(paths)``.
Every preprocessing step is read from ``preprocessing.json`` beside this file; nothing else is assumed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".flac")


class Bundle:
    def __init__(self, folder: Path = HERE) -> None:
        self.folder = Path(folder)
        self.pre = json.loads((self.folder / "preprocessing.json").read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / self.pre["model"]), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    # --- raw inputs to the model's inputs -------------------------------------------------

    def images(self, paths: list[Path]) -> dict[str, np.ndarray]:
        from PIL import Image

        spec = self.pre["image"]
        channels, (height, width) = spec["channels"], spec["size"]
        mean = np.asarray(spec["mean"], np.float32).reshape(-1, 1, 1)
        std = np.asarray(spec["std"], np.float32).reshape(-1, 1, 1)
        batch = np.empty((len(paths), channels, height, width), np.float32)
        for i, path in enumerate(paths):
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, np.float32) / 255.0
            batch[i] = ((pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)) - mean) / std
        return {self.inputs[0]: batch}

    def audio(self, paths: list[Path]) -> dict[str, np.ndarray]:
        import soundfile as sf

        rate, length = self.pre["audio"]["sample_rate"], self.pre["audio"]["length"]
        batch = np.zeros((len(paths), 1, length), np.float32)
        for i, path in enumerate(paths):
            wave, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
            mono = wave.mean(1)
            if file_rate != rate and len(mono):
                m = max(1, round(len(mono) * rate / file_rate))
                spectrum = np.fft.rfft(mono.astype(np.float64))
                mono = np.fft.irfft(spectrum[: min(len(spectrum), m // 2 + 1)], m) * (m / len(mono))
            batch[i, 0, : min(length, len(mono))] = mono[:length]
        return {self.inputs[0]: batch}

    def series(self, path: Path) -> dict[str, np.ndarray]:
        """The last ``window`` rows (in time order) of the series' columns, laid out as the model takes them."""
        spec = self.pre["forecast"]
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in spec["columns"] if rows and c not in rows[0]]
        if missing or len(rows) < spec["window"]:
            raise SystemExit(f"{path}: need {spec['window']} rows of {', '.join(spec['columns'])}")
        if spec.get("time_column"):
            rows.sort(key=lambda r: _time_key(r[spec["time_column"]]))
        last = np.asarray([[float(r[c]) for c in spec["columns"]] for r in rows[-spec["window"]:]], np.float32)
        x = last if spec["layout"] == "time_major" else last.T  # (window, C) or (C, window)
        return {self.inputs[0]: x.reshape(1, *self.pre["input"]["shape"])}

    def table(self, path: Path) -> dict[str, np.ndarray]:
        if "tabular" not in self.pre:  # trained on arrays (.npz): rows of numbers, in the arrays' feature order
            return self.numbers(path)
        columns = self.pre["tabular"]["columns"]
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        missing = [c for c in columns if rows and c not in rows[0]]
        if missing:
            raise SystemExit(f"{path}: missing feature column(s) {', '.join(missing)}")
        categories = {v["column"]: v for v in self.pre["tabular"].get("categorical", [])}
        x = np.asarray([[_category_id(row[c] or "", categories[c]) if c in categories else float(row[c])
                         for c in columns] for row in rows], np.float32)
        return {self.inputs[0]: x.reshape(len(x), *self.pre["input"]["shape"])}

    def numbers(self, path: Path) -> dict[str, np.ndarray]:
        """CSV rows of numbers for a model trained on arrays; a first row that is not numbers is a header."""
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and not all(_is_number(c) for c in rows[0]):
            rows = rows[1:]
        width = int(np.prod(self.pre["input"]["shape"]))
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != width or not all(_is_number(c) for c in r)]
        if not rows or bad:
            raise SystemExit(f"{path}: each row must be {width} numbers (the features in the training arrays' "
                             f"order){f'; row(s) {bad[:5]} are not' if bad else ''}")
        x = np.asarray([[float(c) for c in r] for r in rows], np.float32)
        return {self.inputs[0]: x.reshape(len(x), *self.pre["input"]["shape"])}

    def texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        spec = self.pre["text"]
        tok = Tokenizer.from_file(str(self.folder / spec["tokenizer"]))
        tok.enable_truncation(spec["max_length"])
        tok.enable_padding(pad_id=spec.get("pad_id", 0), length=spec["max_length"])
        encoded = tok.encode_batch(texts)
        self.encoded = list(zip(texts, encoded, strict=True))  # (a token classifier's words and their spans)
        arrays = {"input_ids": np.asarray([e.ids for e in encoded], np.int64),
                  "attention_mask": np.asarray([e.attention_mask for e in encoded], np.int64),
                  "token_type_ids": np.asarray([e.type_ids for e in encoded], np.int64)}
        return {name: arrays[name] for name in self.inputs}

    def arrays(self, path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return {self.inputs[0]: np.asarray(data["x"], np.float32)}

    def inputs_of(self, paths: list[Path]) -> dict[str, np.ndarray]:
        suffixes = {p.suffix.lower() for p in paths}
        if suffixes <= set(IMAGE_SUFFIXES):
            return self.images(paths)
        if suffixes <= set(AUDIO_SUFFIXES):
            return self.audio(paths)
        if len(paths) != 1:
            raise SystemExit("give image files, or one .csv, .jsonl or .npz file")
        path = paths[0]
        if path.suffix.lower() == ".csv":
            return self.series(path) if "forecast" in self.pre else self.table(path)
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            column = self.pre.get("text", {}).get("column", "text")
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return self.texts([" ".join(map(str, r["tokens"])) if "tokens" in r and column not in r
                               else str(r[column]) for r in lines])
        if path.suffix.lower() == ".npz":
            return self.arrays(path)
        raise SystemExit(f"{path}: expected image files, .csv, .jsonl or .npz")

    # --- the model's outputs to answers ---------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        n = next(iter(feeds.values())).shape[0]
        parts = [self.session.run(None, {k: v[i:i + 256] for k, v in feeds.items()})[0] for i in range(0, n, 256)]
        return np.concatenate(parts)

    def answers(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        task, classes = self.pre["task"], self.pre.get("classes")
        if task == "token_classification":
            return [self.tagged(text, enc, row, classes) for (text, enc), row in zip(self.encoded, outputs, strict=True)]
        if task == "classification":
            z = outputs - outputs.max(-1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
            index = probs.argmax(-1)
            return [{"class": classes[i] if classes else int(i), "index": int(i), "probability": float(p[i])}
                    for i, p in zip(index, probs)]
        if "forecast" in self.pre:
            spec = self.pre["forecast"]
            targets = spec["target_columns"]
            return [{"forecast": {t: [float(v) for v in np.ravel(row)[i::len(targets)]] for i, t in enumerate(targets)},
                     "steps": spec["horizon"]} for row in outputs]
        key = "values" if task == "regression" else "embedding"
        return [{key: [float(v) for v in np.ravel(row)]} for row in outputs]

    @staticmethod
    def tagged(text: str, enc: Any, logits: np.ndarray, classes: list[str]) -> dict[str, Any]:
        """Each word's tag (read on its first subword) and the BIO entities they spell."""
        words: list[dict[str, Any]] = []
        for position, word in enumerate(enc.word_ids):
            if word is not None and (not words or words[-1]["index"] != word):
                start = enc.offsets[position][0]
                words.append({"index": word, "start": start, "tag": classes[int(logits[position].argmax())]})
            if word is not None:
                words[-1]["end"] = enc.offsets[position][1]
        entities: list[dict[str, Any]] = []
        for w in words:
            kind = w["tag"][2:]
            if w["tag"].startswith("I-") and entities and entities[-1]["type"] == kind and entities[-1]["open"]:
                entities[-1]["end"] = w["end"]
                continue
            if entities:
                entities[-1]["open"] = False
            if w["tag"][:2] in ("B-", "I-"):
                entities.append({"type": kind, "start": w["start"], "end": w["end"], "open": True})
            elif entities:
                entities[-1]["open"] = False
        return {"words": [{"word": text[w["start"]:w["end"]], "tag": w["tag"]} for w in words],
                "entities": [{"text": text[e["start"]:e["end"]], "type": e["type"], "start": e["start"],
                              "end": e["end"]} for e in entities]}

    def predict_files(self, paths: list[Path]) -> list[dict[str, Any]]:
        paths = [Path(p) for p in paths]
        answers = self.answers(self.run(self.inputs_of(paths)))
        if {p.suffix.lower() for p in paths} <= {*IMAGE_SUFFIXES, *AUDIO_SUFFIXES}:  # one answer per file
            return [{"input": str(p), **a} for p, a in zip(paths, answers, strict=True)]
        return answers

    def predict_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        return self.answers(self.run(self.texts(texts)))


def _category_id(text: str, vocab: dict[str, Any]) -> int:
    """A categorical cell's id: its place in the vocabulary (0: not in it), or its CRC-32 hash bucket."""
    if vocab["kind"] == "hash":
        return zlib.crc32(text.encode("utf-8")) % vocab["buckets"]
    if "_index" not in vocab:
        vocab["_index"] = {t: i + 1 for i, t in enumerate(vocab["tokens"])}
    return vocab["_index"].get(text, 0)


def _time_key(value: str) -> Any:
    """Numbers order as numbers, anything else (ISO dates) as text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--text", action="append", default=[], help="a text to classify or embed (repeatable)")
    args = parser.parse_args(argv)
    bundle = Bundle()
    if args.text:
        answers = bundle.predict_texts(args.text)
    elif args.files:
        answers = bundle.predict_files(args.files)
    else:
        parser.error("give input files or --text")
    for answer in answers:
        print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
