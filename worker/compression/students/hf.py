"""Hugging Face transformers encoders (BERT family) as teachers and students.

A teacher is a local transformers folder (or a zip of one): ``config.json``,
``model.safetensors`` and tokenizer files, optionally in the sentence-transformers
layout (``modules.json``, ``1_Pooling/config.json``). Only safetensors weights are read,
nothing is downloaded and no remote code runs.

`HFEncoder` wraps the transformers backbone so that every model answers the engine's
conventions (``model(**inputs)`` and ``forward_features``) for three tasks:
classification / regression (the backbone's sequence-classification head, logits) and
embedding (mean or CLS pooling of the last hidden state, optionally L2-normalised).
Attention always runs in the "eager" implementation: it is the one that returns
attention probabilities (for attention distillation) and it exports to ONNX.

Our own choices are recorded in config.json as ``kdq_task``, ``kdq_pooling`` and
``kdq_normalize`` by `save_hf_model`, so a saved student loads back unchanged.

Shrunk students (``hf_shrink.py``) may carry two extras beside the backbone: a ``token_map``
(tokenizer id -> row of a trimmed word-embedding table, so the original tokenizer still
applies) and a ``project`` linear layer (a narrowed embedding model's pooled output back to
the teacher's width). They are saved in ``kdq_extra.safetensors`` and announced in config.json
by ``kdq_original_vocab_size`` / ``kdq_output_dim``; transformers alone cannot load such a
folder (sentence-transformers neither): it is read by `load_hf_teacher`, and its ONNX export
holds both.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
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
from ..types import TOKEN_KEYS, ModelOutput, Task, Teacher

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "mpnet")
_NO_TOKEN_TYPES = frozenset({"distilbert", "mpnet"})
_HAS_POOLER = frozenset({"bert", "roberta", "xlm-roberta", "mpnet"})
_PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "mpnet"})
"""Position ids of these models start at ``pad_token_id + 1``."""
_FFN = {"distilbert": ("ffn.lin1", "ffn.lin2", "hidden_dim")}
_FFN_DEFAULT = ("intermediate.dense", "output.dense", "intermediate_size")
"""(FFN input linear, FFN output linear, config key of the FFN width) inside one encoder layer."""

WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "kdq_extra.safetensors"
"""``token_map`` (int32) and ``project.weight`` / ``project.bias`` of a shrunk student."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SEQ_LEN = 512
_MAX_HEADER_BYTES = 100 << 20

_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?(?:encoder|transformer)\.layer\.)(?P<idx>\d+)\.(?P<rest>.+)$")
_POSITION_IDS = re.compile(r"(^|\.)position_ids$")
_HEAD_KEY = re.compile(
    r"(^|\.)(pooler|classifier|pre_classifier|cls|lm_head|qa_outputs|vocab_transform|vocab_layer_norm"
    r"|vocab_projector|discriminator_predictions|generator_predictions|generator_lm_head)\."
)
"""Checkpoint tensors an embedding model (a bare backbone without pooler) may ignore."""


class HFEncoder(nn.Module):
    """A transformers backbone answering ``model(**inputs)`` and ``forward_features``.

    ``backbone`` is an AutoModel (task ``embedding``) or an AutoModelForSequenceClassification
    (``classification`` / ``regression``). ``pooling`` (``mean`` | ``cls``) and ``normalize``
    apply to embeddings only; sequence-classification heads pool the first token themselves.
    ``token_map`` (integer buffer, one entry per tokenizer id) turns tokenizer ids into rows
    of a trimmed embedding table before the backbone sees them; ``project`` maps the pooled
    embedding to another width (before normalisation). Both are None for ordinary models.
    """

    def __init__(self, backbone: nn.Module, task: Task, pooling: str = "mean",
                 normalize: bool = False, *, token_map: torch.Tensor | None = None,
                 project: nn.Linear | None = None) -> None:
        super().__init__()
        if task not in ("classification", "regression", "embedding"):
            raise SpecError(f"unknown task {task!r}")
        if pooling not in ("mean", "cls"):
            raise UnsupportedFormatError(f"pooling {pooling!r} is not supported (use mean or cls)")
        self.backbone = backbone
        self.task: Task = task
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.register_buffer("token_map", token_map)
        self.project = project

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def output_dim(self) -> int:
        """Values per sample: the labels, else the (projected) embedding width."""
        if self.task != "embedding":
            return int(self.config.num_labels)
        return int(self.project.out_features if self.project is not None else self.config.hidden_size)

    @property
    def tokenizer_vocab_size(self) -> int:
        """How many token ids the model takes: the tokenizer's, also when its table is trimmed."""
        return int(self.token_map.numel() if self.token_map is not None else self.config.vocab_size)

    @property
    def uses_token_type_ids(self) -> bool:
        """False for models without segment embeddings (DistilBERT, MPNet) or with only one
        segment (RoBERTa, XLM-R): their ``token_type_ids`` are ignored."""
        segments = int(getattr(self.config, "type_vocab_size", 1))
        return self.config.model_type not in _NO_TOKEN_TYPES and segments > 1

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs the model reads, in ``forward`` order (the ONNX input names)."""
        return TOKEN_KEYS if self.uses_token_type_ids else TOKEN_KEYS[:2]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             token_type_ids: torch.Tensor | None, features: bool) -> tuple[torch.Tensor, Any]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.token_map is not None:  # tokenizer ids -> rows of the trimmed table (ONNX: Gather)
            input_ids = self.token_map[input_ids].to(torch.int64)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        out = self.backbone(**kwargs, output_hidden_states=features, output_attentions=features,
                            return_dict=True)
        if self.task != "embedding":
            return out.logits, out
        last = out.last_hidden_state
        if self.pooling == "cls":
            pooled = last[:, 0]
        else:  # mean over real tokens, as sentence-transformers computes it
            mask = attention_mask.unsqueeze(-1).to(last.dtype)
            pooled = (last * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.project is not None:
            pooled = self.project(pooled)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=1)
        return pooled, out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, attention_mask, token_type_ids, features=False)[0]

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None) -> ModelOutput:
        """Output, hidden states ``[embeddings, layer 1, ..., layer N]`` and attentions per layer."""
        output, out = self._run(input_ids, attention_mask, token_type_ids, features=True)
        return ModelOutput(output, list(out.hidden_states), list(out.attentions))


# --- loading -------------------------------------------------------------------------------


def _as_folder(path: Path) -> Path:
    """The model folder: ``path`` itself, or a zip extracted safely into a new private temp folder
    (which becomes the teacher's ``source_dir``; the caller owns and removes it). A zip holding
    one top folder is looked into."""
    if path.is_file():
        from ..io.archives import safe_extract_zip

        path = safe_extract_zip(path, tempfile.mkdtemp(prefix="kdq-hf-"))
        if not (path / "config.json").is_file():
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
            if len(subdirs) == 1:
                path = subdirs[0]
    if not path.is_dir():
        raise ModelFileError(f"{path.name}: not a model folder or zip")
    return path


def _read_json(path: Path, expected: type = dict) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.name} is not readable JSON: {exc}") from exc
    if not isinstance(data, expected):
        raise ModelFileError(f"{path.name} must hold a JSON {'object' if expected is dict else 'list'}")
    return data


def _check_model_type(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise ModelFileError("the model folder has no config.json")
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedFormatError(
            f"transformers model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return str(model_type)


def _weights_file(folder: Path) -> Path:
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"only pickle weights ({', '.join(pickles)}) were given; they could run code when loaded. "
            f"Convert them to {WEIGHTS_FILE}")
    raise ModelFileError(f"the model folder has no {WEIGHTS_FILE}")


def _check_safetensors(path: Path) -> None:
    """Raise TruncatedFileError when the file is shorter than its header says, before any loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedFileError(f"{path.name} is truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES:
            raise ModelFileError(f"{path.name} is not a safetensors file (header of {n} bytes)")
        if 8 + n > size:
            raise TruncatedFileError(
                f"{path.name} is truncated: its header needs {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
            ends = (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__")
            end = max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ModelFileError(f"{path.name} has a malformed safetensors header: {exc}") from exc
    if 8 + n + end > size:
        raise TruncatedFileError(
            f"{path.name} is truncated: it has {size} bytes, its tensors need {8 + n + end}")


def _sentence_transformers_head(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers layout; ("mean", False) without one."""
    pooling_dir = folder / "1_Pooling"
    normalize = False
    if (folder / "modules.json").is_file():
        for mod in _read_json(folder / "modules.json", list):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1] if isinstance(mod, dict) else repr(mod)
            if kind == "Pooling":
                pooling_dir = folder / str(mod.get("path", ""))
                if not pooling_dir.resolve().is_relative_to(folder.resolve()):
                    raise UnsafeFileError(
                        f"modules.json: pooling path {mod.get('path')!r} escapes the model folder")
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise UnsupportedFormatError(f"sentence-transformers module {kind!r} is not supported "
                                             "(supported: Transformer, Pooling, Normalize)")
    if not (pooling_dir / "config.json").is_file():
        return "mean", normalize
    cfg = _read_json(pooling_dir / "config.json")
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in cfg.items()
                   if k.startswith("pooling_mode_") and v)
    if modes == ["mean_tokens"]:
        return "mean", normalize
    if modes == ["cls_token"]:
        return "cls", normalize
    raise UnsupportedFormatError(f"sentence-transformers pooling {modes} is not supported (use mean or cls)")


def _resolve_head(config: Any, folder: Path, task: str | None) -> tuple[Task, str, bool]:
    """Task, pooling and normalize: the argument, then our ``kdq_*`` keys, then what the files say.
    Sequence-classification heads pool the first token themselves: their pooling reads ``cls``."""
    task = task or getattr(config, "kdq_task", None)
    if task is None:
        archs = getattr(config, "architectures", None) or []
        if any(str(a).endswith("ForSequenceClassification") for a in archs):
            task = "regression" if getattr(config, "problem_type", None) == "regression" else "classification"
        else:
            task = "embedding"
    if task not in ("classification", "regression", "embedding"):
        raise SpecError(f"unknown task {task!r}")
    if task != "embedding":
        return task, "cls", False  # type: ignore[return-value]
    pooling, normalize = getattr(config, "kdq_pooling", None), getattr(config, "kdq_normalize", None)
    if pooling is None or normalize is None:
        st_pooling, st_normalize = _sentence_transformers_head(folder)
        pooling = st_pooling if pooling is None else pooling
        normalize = st_normalize if normalize is None else normalize
    return task, str(pooling), bool(normalize)


def _auto_class(task: str) -> Any:
    from transformers import AutoModel, AutoModelForSequenceClassification

    return AutoModel if task == "embedding" else AutoModelForSequenceClassification


def _init_kwargs(model_type: str, task: str) -> dict[str, Any]:
    """Embedding backbones are built without the (unused) pooler where the model has one."""
    return {"add_pooling_layer": False} if task == "embedding" and model_type in _HAS_POOLER else {}


def _load_backbone(folder: Path, config: Any, task: str) -> nn.Module:
    from safetensors import SafetensorError

    try:
        backbone, info = _auto_class(task).from_pretrained(
            folder, config=config, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, attn_implementation="eager", ignore_mismatched_sizes=True,
            **_init_kwargs(config.model_type, task))
    except SafetensorError as exc:
        raise ModelFileError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelFileError(f"cannot load the transformers model: {exc}") from exc
    if info.get("mismatched_keys"):
        name, ckpt, model = sorted(info["mismatched_keys"], key=str)[0]
        raise ShapeMismatchError(
            f"tensor {name!r} has shape {list(ckpt)} in {WEIGHTS_FILE} but the config needs {list(model)}"
            f" ({len(info['mismatched_keys'])} mismatched)")
    missing = sorted(k for k in info.get("missing_keys", ()) if not _POSITION_IDS.search(k))
    if missing:
        no_head = task != "embedding" and any("classifier" in k for k in missing)
        hint = " (the checkpoint has no classification head; use task 'embedding')" if no_head else ""
        raise MissingTensorError(
            f"{WEIGHTS_FILE} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}{hint}")
    unexpected = sorted(
        k for k in info.get("unexpected_keys", ())
        if not (_POSITION_IDS.search(k) or (task == "embedding" and _HEAD_KEY.search(k))))
    if unexpected:
        raise UnexpectedTensorError(
            f"{WEIGHTS_FILE} has {len(unexpected)} tensor(s) the config does not use: "
            f"{', '.join(unexpected[:5])}")
    backbone = backbone.float().eval()
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteWeightsError(f"tensor {name!r} holds NaN or infinite values")
    return backbone


def _load_tokenizer(folder: Path, config: Any) -> Any:
    from transformers import AutoTokenizer

    # transformers 5 would silently build an empty-vocabulary tokenizer without these files
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFileError(f"the model folder has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"cannot load the tokenizer: {exc}") from exc
    vocab = int(getattr(config, "kdq_original_vocab_size", None) or config.vocab_size)
    if len(tokenizer) > vocab:
        raise ModelFileError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}")
    return tokenizer


def _positive_int(config: Any, key: str) -> int | None:
    value = getattr(config, key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelFileError(f"config.json: {key} must be a positive integer, not {value!r}")
    return value


def _load_extras(folder: Path, config: Any) -> tuple[torch.Tensor | None, nn.Linear | None]:
    """The ``token_map`` and ``project`` of a shrunk student, checked against config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    vocab, out_dim = _positive_int(config, "kdq_original_vocab_size"), _positive_int(config, "kdq_output_dim")
    if vocab is None and out_dim is None:
        return None, None
    path = folder / EXTRA_FILE
    if not path.is_file():
        raise MissingTensorError(f"config.json announces a trimmed vocabulary or an output projection, "
                                 f"but the folder has no {EXTRA_FILE}")
    _check_safetensors(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{EXTRA_FILE} is not a valid safetensors file: {exc}") from exc
    hidden = int(config.hidden_size)
    expected: dict[str, tuple[int, ...]] = {}
    if vocab is not None:
        expected["token_map"] = (vocab,)
    if out_dim is not None:
        expected |= {"project.weight": (out_dim, hidden), "project.bias": (out_dim,)}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UnexpectedTensorError(f"{EXTRA_FILE} has tensor(s) config.json does not announce: "
                                    f"{', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        if name not in tensors:
            raise MissingTensorError(f"{EXTRA_FILE} lacks the tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise ShapeMismatchError(f"tensor {name!r} has shape {list(tensors[name].shape)} in {EXTRA_FILE} "
                                     f"but config.json needs {list(shape)}")
    token_map = None
    if vocab is not None:
        token_map = tensors["token_map"]
        if token_map.dtype not in (torch.int32, torch.int64):
            raise ModelFileError(f"{EXTRA_FILE}: token_map must hold int32 or int64, not {token_map.dtype}")
        if token_map.numel() and not (0 <= int(token_map.min()) and int(token_map.max()) < int(config.vocab_size)):
            raise ModelFileError(f"{EXTRA_FILE}: token_map points outside the {config.vocab_size} embedding rows")
    project = None
    if out_dim is not None:
        weight, bias = tensors["project.weight"].float(), tensors["project.bias"].float()
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise NonFiniteWeightsError(f"{EXTRA_FILE}: the output projection holds NaN or infinite values")
        project = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            project.weight.copy_(weight)
            project.bias.copy_(bias)
    return token_map, project


def _max_seq_len(config: Any, folder: Path) -> int:
    limit = int(config.max_position_embeddings)
    if config.model_type in _PADDING_OFFSET_POSITIONS:
        limit -= int(config.pad_token_id or 0) + 1
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():  # the length a sentence-transformers model was trained for
        limit = min(limit, int(_read_json(st_config).get("max_seq_length") or limit))
    return max(1, min(limit, MAX_SEQ_LEN))


def load_hf_teacher(folder: Path, *, task: str | None = None) -> Teacher:
    """Load a local transformers folder (or zip) as a teacher; raise typed errors on bad files.

    The task is ``task``, else config.json's ``kdq_task``, else ``classification`` /
    ``regression`` for a ``*ForSequenceClassification`` checkpoint, else ``embedding``
    (pooling from the sentence-transformers files, default mean).
    """
    from transformers import AutoConfig

    folder = _as_folder(Path(folder))
    _check_model_type(folder)
    weights = _weights_file(folder)
    _check_safetensors(weights)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"config.json is not a valid transformers config: {exc}") from exc
    task_, pooling, normalize = _resolve_head(config, folder, task)
    token_map, project = _load_extras(folder, config)
    if project is not None and task_ != "embedding":
        raise ModelFileError(f"config.json: kdq_output_dim is for embedding models, this one is {task_}")
    module = HFEncoder(_load_backbone(folder, config, task_), task_, pooling, normalize,
                       token_map=token_map, project=project).eval()
    tokenizer = _load_tokenizer(folder, config)
    extra_bytes = (folder / EXTRA_FILE).stat().st_size if token_map is not None or project is not None else 0
    return Teacher(
        kind="hf",
        task=task_,
        input_kind="tokens",
        input_shape=(_max_seq_len(config, folder),),
        output_dim=module.output_dim,
        config=module.config.to_dict(),
        module=module,
        tokenizer=tokenizer,
        source_dir=folder,
        num_parameters=sum(p.numel() for p in module.parameters()),
        size_bytes=weights.stat().st_size + extra_bytes,
    )


def tokenize(tokenizer: Any, texts: list[str], pairs: list[str] | None = None,
             max_length: int = 128) -> dict[str, torch.Tensor]:
    """Token tensors (int64) padded to the longest sequence, truncated to ``max_length``."""
    if not texts:
        raise DatasetError("no texts to tokenize")
    if pairs is not None and len(pairs) != len(texts):
        raise DatasetError(f"{len(texts)} texts but {len(pairs)} text pairs")
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, padding="longest",
                    truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k].to(torch.int64) for k in TOKEN_KEYS if k in enc}


# --- students --------------------------------------------------------------------------------


def _encoder_of(teacher: Teacher) -> HFEncoder:
    if not isinstance(teacher.module, HFEncoder):
        raise SpecError("this student needs a transformers (hf) teacher")
    return teacher.module


def hf_layer_count(teacher: Teacher) -> int:
    """Number of encoder layers of an hf teacher."""
    return int(_encoder_of(teacher).config.num_hidden_layers)


def _build_like(enc: HFEncoder, config: Any, *, token_map: torch.Tensor | None = None,
                project: nn.Linear | None = None) -> HFEncoder:
    """A freshly initialised HFEncoder of the same class, task and pooling for ``config``."""
    config._attn_implementation = "eager"
    try:
        backbone = type(enc.backbone)(config, **_init_kwargs(config.model_type, enc.task))
    except (ValueError, TypeError, KeyError) as exc:
        raise SpecError(f"bad transformers config for the student: {exc}") from exc
    return HFEncoder(backbone, enc.task, enc.pooling, enc.normalize, token_map=token_map, project=project).eval()


def _same_token_map(enc: HFEncoder, config: Any) -> torch.Tensor | None:
    """A trimmed teacher's token map, for a student that keeps its (trimmed) vocabulary."""
    if enc.token_map is None or int(config.vocab_size) != int(enc.config.vocab_size):
        return None
    return enc.token_map.clone()


def _choose_layers(total: int, layers: list[int] | None, num_layers: int | None) -> list[int]:
    if layers is not None:
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < total for i in layers):
            raise SpecError(f"student layers {layers} must be distinct teacher layers in 0..{total - 1}")
        return sorted(layers)
    n = num_layers if num_layers is not None else max(1, total // 2)
    if not 1 <= n <= total:
        raise SpecError(f"student num_layers {n} must be between 1 and the teacher's {total}")
    return [0] if n == 1 else [int(i * (total - 1) / (n - 1) + 0.5) for i in range(n)]


def derive_hf_student(teacher: Teacher, *, layers: list[int] | None = None, num_layers: int | None = None,
                      width_ratio: float | None = None, hidden_size: int | None = None,
                      calibration: dict[str, torch.Tensor] | None = None) -> tuple[HFEncoder, dict[int, int]]:
    """A smaller copy of the teacher and its default layer map.

    Layers: ``layers`` (distinct teacher layer indices, used in ascending order), else
    ``num_layers`` (default half) evenly spaced from the first to the last (6 -> [0, 3, 5],
    12 -> [0, 2, 4, 7, 9, 11]), as for zoo students. Keeping the last layer matters: the
    pooled output is read from it (all-MiniLM-L6-v2 -> 3 layers, cosine to the teacher before
    any training: 0.36 with [0, 2, 4], 0.66 with [0, 3, 5]). Embeddings, kept layers and the
    pooler / classifier are copied from the teacher.

    ``width_ratio`` < 1 narrows the feed-forward block of each kept layer to
    ``round(ffn * ratio)`` units, keeping those with the largest ``|w_in row| * |w_out column|``.
    ``width_ratio`` leaves attention heads alone: transformers ties the head size to
    ``hidden_size / num_attention_heads``, so fewer heads would change every head's shape.

    ``hidden_size`` below the teacher's narrows the residual stream (and the attention to
    fewer whole heads): see `hf_shrink.narrow_hidden`; ``calibration`` (token inputs, a few
    dozen texts) lets it rank dimensions and heads by their activations instead of weights.
    A trimmed teacher's token map comes along.

    The layer map is ``{student hidden index: teacher hidden index}`` in ``forward_features``
    indexing: 0 (embeddings) -> 0, student layer i+1 -> teacher layer ``kept[i] + 1``.
    """
    enc = _encoder_of(teacher)
    kept = _choose_layers(hf_layer_count(teacher), layers, num_layers)
    if width_ratio is not None and not 0.0 < width_ratio <= 1.0:
        raise SpecError(f"width_ratio {width_ratio} must be in (0, 1]")
    ffn_in, ffn_out, ffn_key = _FFN.get(enc.config.model_type, _FFN_DEFAULT)
    config = copy.deepcopy(enc.config)
    config.num_hidden_layers = len(kept)
    width = int(getattr(config, ffn_key))
    new_width = width if width_ratio is None else max(1, round(width * width_ratio))
    setattr(config, ffn_key, new_width)

    src = enc.backbone.state_dict()
    state: dict[str, torch.Tensor] = {}
    units: dict[int, torch.Tensor] = {}
    for key, value in src.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value.clone()
            continue
        t = int(m["idx"])
        if t not in kept:
            continue
        pre, rest = m["pre"], m["rest"]
        if new_width < width and t not in units:
            w_in, w_out = src[f"{pre}{t}.{ffn_in}.weight"], src[f"{pre}{t}.{ffn_out}.weight"]
            score = w_in.norm(dim=1) * w_out.norm(dim=0)
            units[t] = score.topk(new_width).indices.sort().values
        if t in units and rest in (f"{ffn_in}.weight", f"{ffn_in}.bias"):
            value = value[units[t]]
        elif t in units and rest == f"{ffn_out}.weight":
            value = value[:, units[t]]
        state[f"{pre}{kept.index(t)}.{rest}"] = value.clone()

    layer_map = {0: 0, **{i + 1: t + 1 for i, t in enumerate(kept)}}
    project = copy.deepcopy(enc.project)
    if hidden_size is not None and int(hidden_size) != int(config.hidden_size):
        from .hf_shrink import narrow_hidden

        state, config, project = narrow_hidden(enc, state, config, int(hidden_size), layer_map, calibration)
    token_map = None if enc.token_map is None else enc.token_map.clone()
    student = _build_like(enc, config, token_map=token_map, project=project)
    student.backbone.load_state_dict(state, strict=True)
    return student, layer_map


def hf_student_from_config(teacher: Teacher, hf_config: dict[str, Any]) -> tuple[HFEncoder, dict[int, int]]:
    """A new model of the teacher's type from ``hf_config`` merged over the teacher's config.

    Same task, pooling and labels. Embedding tensors (word, position, token type, LayerNorm)
    are copied from the teacher where their shapes match; the rest is freshly initialised.
    The layer map spreads the student's layers evenly over the teacher's (last -> last).
    """
    enc = _encoder_of(teacher)
    base = enc.config
    if not isinstance(hf_config, dict):
        raise SpecError("student.hf_config must be a JSON object")
    if hf_config.get("model_type", base.model_type) != base.model_type:
        raise SpecError(f"student.hf_config model_type {hf_config['model_type']!r} differs from the "
                        f"teacher's {base.model_type!r}")
    merged = base.to_dict()
    aliases = getattr(type(base), "attribute_map", {})
    for key, value in hf_config.items():
        key = aliases.get(key, key)
        if key not in merged:
            raise SpecError(f"student.hf_config: {key!r} is not a {base.model_type} config key")
        merged[key] = value
    try:
        config = type(base).from_dict(merged)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"bad student.hf_config: {exc}") from exc
    student = _build_like(enc, config, token_map=_same_token_map(enc, config))

    src, dst = enc.backbone.state_dict(), student.backbone.state_dict()
    copied = {k: src[k] for k, v in dst.items()
              if ".embeddings." in f".{k}" and k in src and src[k].shape == v.shape}
    student.backbone.load_state_dict(copied, strict=False)
    n, total = int(config.num_hidden_layers), hf_layer_count(teacher)
    return student, {i: i * total // n for i in range(n + 1)}


def save_hf_model(module: HFEncoder, folder: Path, tokenizer: Any) -> Path:
    """Save as a transformers folder (safetensors) that `load_hf_teacher` loads back unchanged."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = module.config
    config.kdq_task, config.kdq_pooling, config.kdq_normalize = module.task, module.pooling, module.normalize
    extras: dict[str, torch.Tensor] = {}
    for key in ("kdq_original_vocab_size", "kdq_output_dim"):  # written below only when they apply
        if hasattr(config, key):
            delattr(config, key)
    if module.token_map is not None:
        config.kdq_original_vocab_size = int(module.token_map.numel())
        extras["token_map"] = module.token_map.detach().to("cpu", torch.int32).contiguous()
    if module.project is not None:
        config.kdq_output_dim = int(module.project.out_features)
        extras["project.weight"] = module.project.weight.detach().float().cpu().contiguous()
        extras["project.bias"] = module.project.bias.detach().float().cpu().contiguous()
    module.backbone.save_pretrained(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelFileError(f"transformers did not write {WEIGHTS_FILE} into {folder}")
    (folder / EXTRA_FILE).unlink(missing_ok=True)
    if extras:
        save_file(extras, str(folder / EXTRA_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
