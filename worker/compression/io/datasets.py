"""Read an uploaded dataset file into a `TensorData`.

Formats (``DataSpec.format``; ``auto`` picks by file extension):

* ``npz`` / ``safetensors``: array ``x`` (required) and ``y`` (optional). Float ``x`` of rank
  2 is vectors, 3 signals ``(N, C, L)``, 4 images ``(N, C, H, W)``. For a text teacher ``x``
  (or ``input_ids``) holds integer token ids, with optional ``attention_mask`` / ``token_type_ids``.
* ``csv`` / ``parquet`` (tabular): numeric feature columns and an optional label column.
* ``jsonl`` / ``text_csv`` (text): a text column, an optional text-pair column and an optional
  label, tokenized with the teacher's tokenizer; or pre-split ``tokens`` with per-word ``tags`` (token
  classification, `data_tokens`). An auto-detected ``.csv`` is text when it has
  ``DataSpec.text_column`` (or the teacher takes text), else tabular.
* ``image_zip``: a zip (or tar, tar.gz) of class folders of PNG / JPEG images, resized and normalised.
* ``audio_zip``: a zip (or tar) of class folders of WAV / FLAC clips, mono, resampled, cut or padded
  (`data_audio`); an auto-detected ``.zip`` whose files are all audio is one.

Labels are optional everywhere: unlabelled data still serves for pure distillation. Integer
or string labels become class indices with ``classes`` names (integers ``k`` keep index ``k``
unless every one is a given class name; strings are numbered in sorted order); fractional numbers are regression targets.

Row numbers in errors are where a person finds the row: the line number in CSV and JSONL
files (a CSV header is line 1), the 1-based row in Parquet, and the 0-based index ``i`` of
``x[i]`` in array files.

Hostile uploads: arrays never unpickle, image archives are extracted with the
`archives.safe_extract` rules, images are capped in pixels before decoding and only the
PNG and JPEG decoders run, and decompressed ``.npz`` content and image tensors are capped in bytes.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DatasetError
from ..measure.entities import IGNORE
from ..spec import DataSpec
from ..types import InputKind, TensorData
from .data_arrays import load_arrays
from .data_audio import load_audio
from .data_common import DataLimits, ReadContext
from .data_images import load_images
from .data_series import chronological_split
from .data_tables import load_csv, load_jsonl, load_parquet
from .data_vocab import recorded_vocabularies
from .onnx_inputs import layout_columns
from .sniff import has_audio

FORMATS = ("npz", "safetensors", "csv", "parquet", "jsonl", "text_csv", "image_zip", "audio_zip")
_BY_SUFFIX = {".npz": "npz", ".safetensors": "safetensors", ".csv": "csv", ".parquet": "parquet",
              ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".zip": "image_zip",
              ".tar": "image_zip", ".tgz": "image_zip"}
ACCEPTED = (".npz, .safetensors, .csv, .parquet/.pq, .jsonl/.ndjson/.json (JSON Lines), "
            ".zip (image or audio class folders)")


def load_dataset(
    path: str | os.PathLike[str],
    spec: DataSpec | None = None,
    *,
    tokenizer: Any = None,
    input_shape: tuple[int, ...] | None = None,
    input_kind: InputKind | None = None,
    task: str | None = None,
    structure_only: bool = False,
    limits: DataLimits = DataLimits(),
    vocabularies: list[dict[str, Any]] | None = None,
    leading_columns: list[str] | None = None,
) -> TensorData:
    """Read ``path`` into tensors shaped for the teacher.

    ``input_shape`` (per sample; dims ≤ 0 are dynamic), ``input_kind``, ``task`` and
    ``tokenizer`` come from the teacher when known: array and tabular samples are reshaped
    to ``input_shape`` when the element counts agree, images are sized from it, text is
    tokenized with ``tokenizer``. ``structure_only`` parses text rows and labels without
    tokenizing (upload validation, before a teacher is chosen): token inputs are then empty
    ``(N, 0)`` tensors and ``meta["tokenized"]`` is False. ``limits`` caps hostile uploads. ``vocabularies``: the
    categorical vocabularies a table is read with (`data_vocab`; default: built from the file);
    ``leading_columns``: a click ONNX teacher's id columns, first in ``x`` (`onnx_inputs`).
    """
    path = Path(path)
    spec = spec or DataSpec()
    if not path.is_file():
        raise DatasetError(f"{path.name}: no such file")
    fmt = spec.format if spec.format != "auto" else _BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"cannot tell the format of {path.name!r} from its extension; "
                           f"accepted: {ACCEPTED}")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
    if fmt == "image_zip" and spec.format == "auto" and _audio_archive(path):
        fmt = "audio_zip"
    if spec.task == "forecasting" and fmt not in ("csv", "parquet"):
        raise DatasetError(f"forecasting reads a time series from a CSV or Parquet table, not {fmt}")
    ctx = ReadContext(spec, tokenizer, input_shape, input_kind, task, structure_only, limits, vocabularies,
                      leading_columns)
    if fmt in ("npz", "safetensors"):
        data = load_arrays(path, fmt, ctx)
    elif fmt in ("csv", "text_csv"):
        data = load_csv(path, fmt, ctx)
    elif fmt == "parquet":
        data = load_parquet(path, ctx)
    elif fmt == "jsonl":
        data = load_jsonl(path, ctx)
    elif fmt == "audio_zip":
        data = load_audio(path, ctx)
    else:
        data = load_images(path, ctx)
    if input_kind is not None and data.input_kind != input_kind:
        raise DatasetError(f"the teacher takes {input_kind} inputs but {path.name} holds "
                           f"{data.input_kind} data")
    if spec.task == "policy":
        _policy_meta(data, spec, path.name)
    data.meta.setdefault("format", fmt)
    data.meta["file"] = path.name
    if data.classes is not None:
        data.meta["num_classes"] = len(data.classes)
    return data


def _audio_archive(path: Path) -> bool:
    """A zip whose members are audio files (names only: nothing is extracted here)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return has_audio(zf.namelist()[:200_000])
    except (zipfile.BadZipFile, OSError):
        return False


def _policy_meta(data: TensorData, spec: DataSpec, source: str) -> None:
    """A policy's observations are vectors; the meta says how its outputs are judged (`fields.policy`)."""
    if data.input_kind != "vector":
        raise DatasetError(f"a policy maps observation vectors to actions, but {source} holds {data.input_kind} data")
    if spec.action_space == "discrete" and data.y is not None and data.classes is None:
        raise DatasetError(f"a discrete policy's logged actions are action indices, but {source}'s are fractional")
    if spec.action_space == "continuous" and data.classes is not None and data.y is not None:
        data.y = data.y.float().reshape(len(data.y), -1)  # integer-valued continuous actions are still values
        data.classes = None
    data.meta.update({"field": "policy", "action_space": spec.action_space or "", "env": spec.env or "",
                      "episodes": spec.episodes})


def train_eval_split(train: TensorData, eval_data: TensorData | None,
                     spec: DataSpec) -> tuple[TensorData, TensorData]:
    """The training and evaluation data: ``eval_data`` made compatible with ``train``, or a
    seeded hold-out of ``spec.eval_fraction`` of ``train``.

    Token data of different padded lengths is right-padded (id 0, mask 0) to the longer one.
    Eval class labels are renumbered to the training ``classes`` when they are a subset.
    """
    if eval_data is None and train.meta.get("field") == "forecasting":
        return chronological_split(train, spec.eval_fraction)
    if eval_data is None:
        try:
            return train.split(spec.eval_fraction, spec.split_seed)
        except ValueError as exc:
            raise DatasetError(f"cannot hold out {spec.eval_fraction:.0%} of {len(train)} samples "
                               f"for evaluation ({exc}); upload a separate evaluation dataset") from exc
    if eval_data.input_kind != train.input_kind:
        raise DatasetError(f"the evaluation data holds {eval_data.input_kind} inputs but the training data "
                           f"holds {train.input_kind} inputs")
    if set(eval_data.inputs) != set(train.inputs):
        raise DatasetError(f"the evaluation data has inputs {sorted(eval_data.inputs)} but the training data "
                           f"has {sorted(train.inputs)}")
    if train.input_kind == "tokens":
        length = max(train.inputs["input_ids"].shape[1], eval_data.inputs["input_ids"].shape[1])
        train, eval_data = _pad_tokens(train, length), _pad_tokens(eval_data, length)
    for key, value in train.inputs.items():
        got, want = tuple(eval_data.inputs[key].shape[1:]), tuple(value.shape[1:])
        if got != want:
            raise DatasetError(f"evaluation samples of {key!r} have shape {got} but training samples "
                               f"have {want}")
    return train, _align_labels(train, eval_data)


def _is_index_classes(classes: list[str]) -> bool:
    return classes == [str(i) for i in range(len(classes))]


def _align_labels(train: TensorData, eval_data: TensorData) -> TensorData:
    if train.y is None or eval_data.y is None:
        return eval_data
    if (train.classes is None) != (eval_data.classes is None):
        kinds = ("class labels", "numeric targets")
        raise DatasetError(f"the training data has {kinds[train.classes is None]} but the evaluation data has "
                           f"{kinds[eval_data.classes is None]}")
    if train.classes is None or eval_data.classes is None:
        if train.y.shape[1:] != eval_data.y.shape[1:]:
            raise DatasetError(f"evaluation targets have shape {tuple(eval_data.y.shape[1:])} but training "
                               f"targets have {tuple(train.y.shape[1:])}")
        return eval_data
    if train.classes == eval_data.classes or (_is_index_classes(train.classes)
                                              and _is_index_classes(eval_data.classes)):
        return eval_data  # same numbering; either side may simply lack the highest classes
    unknown = [c for c in eval_data.classes if c not in train.classes]
    if unknown:
        raise DatasetError("the evaluation data has classes the training data lacks: "
                           + ", ".join(unknown[:10]))
    index = {c: i for i, c in enumerate(train.classes)}
    remap = torch.tensor([index[c] for c in eval_data.classes], dtype=torch.long)
    return replace(eval_data, y=remap[eval_data.y], classes=train.classes)


def _pad_tokens(data: TensorData, length: int) -> TensorData:
    pad = length - data.inputs["input_ids"].shape[1]
    if pad == 0:
        return data
    y = data.y  # per-token labels (token classification) are padded with the ignored label
    if y is not None and data.meta.get("labels") == "per_word":
        y = F.pad(y, (0, pad), value=IGNORE)
    return replace(data, inputs={k: F.pad(v, (0, pad), value=0) for k, v in data.inputs.items()}, y=y)


def teacher_normalisation(data_spec: DataSpec, teacher: Any) -> dict[str, Any]:
    """The teacher's own image mean and std (`types.Teacher.preprocessing`), for a job that names no scale,
    mean or std; {} otherwise (what the job says wins)."""
    pre = getattr(teacher, "preprocessing", None)
    if not pre or data_spec.image_scale != "auto" or data_spec.image_mean is not None \
            or data_spec.image_std is not None:
        return {}
    return {"image_mean": list(pre["image_mean"]), "image_std": list(pre["image_std"])}


def load_for_teacher(path: Path, eval_path: Path | None, data_spec: DataSpec, teacher: Any, task: str
                     ) -> tuple[TensorData, TensorData, dict[str, Any] | None]:  # fmt: skip
    """The job's data read for ``teacher`` (a `types.Teacher`) and split: (train, eval, class order).
    Class labels are numbered in the teacher's order — its own names, else those given, else sorted
    — and the class order says which (``teacher``, ``given``, ``sorted``, or ``indices`` when the labels
    were integers already). Categorical columns are read with the teacher's vocabularies when it has them,
    and the evaluation file with the training file's. Images are normalised as the teacher's own files say when the job does not
    say (`teacher_normalisation`)."""
    source = "given" if data_spec.classes is not None else "sorted"
    if data_spec.classes is None and teacher.classes and task in ("classification", "token_classification"):
        data_spec, source = data_spec.model_copy(update={"classes": list(teacher.classes)}), "teacher"
    norm = teacher_normalisation(data_spec, teacher)
    if norm:
        data_spec = data_spec.model_copy(update=norm)
    kw: dict[str, Any] = {"tokenizer": teacher.tokenizer, "input_shape": teacher.input_shape,
                          "input_kind": teacher.input_kind, "task": task,
                          "leading_columns": layout_columns(teacher)}  # fmt: skip
    data = load_dataset(path, data_spec, vocabularies=recorded_vocabularies(teacher), **kw)
    unknown_text(data, data_spec, teacher)
    eval_data = load_dataset(eval_path, data_spec, vocabularies=data.meta.get("categorical"), **kw) \
        if eval_path else None
    if eval_data is not None:
        match_columns(data, eval_data, eval_path.name if eval_path else "the evaluation file")
    for d in (data, eval_data) if norm else ():
        if d is not None and d.input_kind == "image":
            d.meta["image_scale"] = teacher.preprocessing.get("source", "teacher")
    train, evald = train_eval_split(data, eval_data, data_spec)
    if train.classes is None:
        return train, evald, None
    integers = train.classes == [str(i) for i in range(len(train.classes))] and source == "sorted"
    return train, evald, {"source": "indices" if integers else source, "classes": list(train.classes)}


def match_columns(data: TensorData, eval_data: TensorData, source: str) -> None:
    """Put the evaluation table's feature columns in the training table's order, by name: read by
    position, an eval CSV with two columns swapped scored the teacher 0.94 instead of 0.96 and the job
    said ``ship`` (a reversed one failed as a teacher that disagrees with the labels). Columns missing
    from it, or not in the training table, are refused by name."""
    train_cols, eval_cols = data.meta.get("columns"), eval_data.meta.get("columns")
    if not train_cols or not eval_cols or train_cols == eval_cols:
        return
    missing = [c for c in train_cols if c not in eval_cols]
    extra = [c for c in eval_cols if c not in train_cols]
    if missing or extra or len(set(eval_cols)) != len(eval_cols):
        said = [f"it lacks {', '.join(map(repr, missing[:5]))}" if missing else "",
                f"the training data has no {', '.join(map(repr, extra[:5]))}" if extra else ""]
        raise DatasetError(f"{source}: its feature columns are not the training data's ("
                           + "; ".join(p for p in said if p) + "): the evaluation data must have the same columns, "
                           "in any order")
    x = eval_data.inputs["x"]
    flat = x.reshape(len(x), -1)
    if flat.shape[1] != len(eval_cols):
        return  # not one value per column (cannot happen for tables; left as read)
    order = [eval_cols.index(c) for c in train_cols]
    eval_data.inputs["x"] = flat[:, order].reshape(x.shape).contiguous()
    eval_data.meta["columns"] = list(train_cols)
    eval_data.meta["columns_reordered"] = True


def unknown_text(data: TensorData, spec: DataSpec, teacher: Any) -> None:
    """Refuse text columns a teacher of numbers never saw: without a vocabulary of its own (a zoo
    ``ctr`` teacher records one) the job's ids would be numbers the teacher was not trained on, and
    the student would learn from its answers to them. Naming the columns in ``categorical_columns``
    says the teacher takes ids numbered as the job numbers them (by frequency, 0 for unseen)."""
    found = [v["column"] for v in data.meta.get("categorical") or []]
    if not found or spec.categorical_columns or recorded_vocabularies(teacher) is not None:
        return
    if (getattr(teacher, "config", None) or {}).get("architecture") == "ctr":
        return
    raise DatasetError(f"column(s) {', '.join(map(repr, found[:5]))} hold text, and this teacher takes numbers: it "
                       "records no vocabulary for them. Encode them the way the teacher was trained (numbers, "
                       "one-hot columns), or name them in data.categorical_columns if the teacher takes ids "
                       "numbered by frequency (0 for values not seen)")

