"""Hugging Face transformers folders: load one as a teacher, save a student as one, tokenize text.

A teacher is a local transformers folder (or a zip of one): ``config.json``,
``model.safetensors`` and tokenizer files, optionally in the sentence-transformers
layout (``modules.json``, ``1_Pooling/config.json``). Only safetensors weights are read,
nothing is downloaded and no remote code runs.

Our own choices are recorded in config.json as ``kdq_task``, ``kdq_pooling`` and
``kdq_normalize`` by `save_hf_model`, so a saved student loads back unchanged. A shrunk
student's ``token_map`` and output ``project`` are saved in ``kdq_extra.safetensors`` and
announced in config.json by ``kdq_original_vocab_size`` / ``kdq_output_dim``; transformers
alone cannot load such a folder (sentence-transformers neither): it is read by
`load_hf_teacher`, and its ONNX export holds both.

transformers is imported inside the functions that use it: it is heavy (seconds), and only
Hugging Face teachers and students need it.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
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
from ..students.hf_model import (
    PADDING_OFFSET_POSITIONS,
    SUPPORTED_MODEL_TYPES,
    HFEncoder,
    init_kwargs,
)
from ..students.hf_vision import HFVisionEncoder, image_shape, is_vision, vision_types
from ..types import TOKEN_KEYS, Task, Teacher
from .archives import safe_extract_zip
from .hf_vision_io import read_image_preprocessing
from .json_file import read_json
from .teacher_meta import class_names

WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "kdq_extra.safetensors"
"""``token_map`` (int32) and ``project.weight`` / ``project.bias`` of a shrunk student."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_SEQ_LEN = 512
_MAX_HEADER_BYTES = 100 << 20

_POSITION_IDS = re.compile(r"(^|\.)position_ids$")
_HEAD_KEY = re.compile(
    r"(^|\.)(pooler|classifier|pre_classifier|cls|lm_head|qa_outputs|vocab_transform|vocab_layer_norm"
    r"|vocab_projector|discriminator_predictions|generator_predictions|generator_lm_head)\."
)
"""Checkpoint tensors an embedding model (a bare backbone without pooler) may ignore."""


def _as_folder(path: Path) -> Path:
    """The model folder: ``path`` itself, or a zip extracted safely into a new private temp folder
    (which becomes the teacher's ``source_dir``; the caller owns and removes it). A zip holding
    one top folder is looked into."""
    if path.is_file():
        path = safe_extract_zip(path, tempfile.mkdtemp(prefix="kdq-hf-"))
        if not (path / "config.json").is_file():
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))]
            if len(subdirs) == 1:
                path = subdirs[0]
    if not path.is_dir():
        raise ModelFileError(f"{path.name}: not a model folder or zip")
    return path


def _check_model_type(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise ModelFileError("the model folder has no config.json")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES + vision_types():
        raise UnsupportedFormatError(
            f"transformers model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES + vision_types())}")
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


def _check_safetensors(path: Path) -> int:
    """Raise TruncatedFileError when the file is shorter than its header says, before any loading;
    return how many values its tensors hold."""
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
            tensors = [v for k, v in header.items() if k != "__metadata__"]
            end = max((int(v["data_offsets"][1]) for v in tensors), default=0)
            values = sum(math.prod(int(d) for d in v["shape"]) for v in tensors)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ModelFileError(f"{path.name} has a malformed safetensors header: {exc}") from exc
    if 8 + n + end > size:
        raise TruncatedFileError(
            f"{path.name} is truncated: it has {size} bytes, its tensors need {8 + n + end}")
    return values


def _check_config_size(config: Any, task: str, stored: int) -> None:
    """A config.json that describes a far bigger model than its weights hold is refused before the
    model is built: transformers would allocate every tensor the config names (a 78 KB upload saying
    ``vocab_size: 40000000`` asks for gigabytes). Counted on the meta device, which allocates nothing."""
    try:
        with torch.device("meta"):
            model = _auto_class(task, config.model_type).from_config(config, attn_implementation="eager", trust_remote_code=False,
                                                  **init_kwargs(config.model_type, task))  # fmt: skip
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelFileError(f"config.json does not describe a buildable model: {exc}") from exc
    need = sum(p.numel() for p in model.parameters())
    if need > 1.5 * stored + 1_000_000:  # (room for a head that is initialised, not stored)
        raise ShapeMismatchError(
            f"config.json describes a model of {need:,} parameters but {WEIGHTS_FILE} holds {stored:,} values: "
            f"the config does not match its weights (a vocab_size, hidden_size, intermediate_size, "
            f"max_position_embeddings or layer count larger than the checkpoint's?)")


def _sentence_transformers_head(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers layout; ("mean", False) without one."""
    pooling_dir = folder / "1_Pooling"
    normalize = False
    if (folder / "modules.json").is_file():
        for mod in read_json(folder / "modules.json", list):
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
    cfg = read_json(pooling_dir / "config.json")
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
        if is_vision(config.model_type) or any(str(a).endswith("ForSequenceClassification") for a in archs):
            task = "regression" if getattr(config, "problem_type", None) == "regression" else "classification"
        elif any(str(a).endswith("ForTokenClassification") for a in archs):
            task = "token_classification"
        else:
            task = "embedding"
    if task not in ("classification", "regression", "embedding", "token_classification"):
        raise SpecError(f"unknown task {task!r}")
    if task != "embedding":
        return task, "cls", False  # type: ignore[return-value]
    pooling, normalize = getattr(config, "kdq_pooling", None), getattr(config, "kdq_normalize", None)
    if pooling is None or normalize is None:
        st_pooling, st_normalize = _sentence_transformers_head(folder)
        pooling = st_pooling if pooling is None else pooling
        normalize = st_normalize if normalize is None else normalize
    return task, str(pooling), bool(normalize)


def _auto_class(task: str, model_type: str) -> Any:
    from transformers import (  # heavy: only HF models need it
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    if is_vision(model_type):
        if task == "embedding":
            raise UnsupportedFormatError(f"a {model_type} teacher is an image classifier: task 'embedding' is "
                                         "not supported for it (use classification or regression)")
        if task == "token_classification":
            raise UnsupportedFormatError(f"a {model_type} teacher is an image classifier, not a token classifier")
        return AutoModelForImageClassification
    if task == "token_classification":
        return AutoModelForTokenClassification
    return AutoModel if task == "embedding" else AutoModelForSequenceClassification


def _load_backbone(folder: Path, config: Any, task: str) -> nn.Module:
    try:
        backbone, info = _auto_class(task, config.model_type).from_pretrained(
            folder, config=config, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, attn_implementation="eager", ignore_mismatched_sizes=True,
            **init_kwargs(config.model_type, task))
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
        use = "a ViTForImageClassification checkpoint" if is_vision(config.model_type) else "task 'embedding'"
        hint = f" (the checkpoint has no classification head; use {use})" if no_head else ""
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
    from transformers import AutoTokenizer  # heavy: only HF models need it

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
    if config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= int(config.pad_token_id or 0) + 1
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():  # the length a sentence-transformers model was trained for
        limit = min(limit, int(read_json(st_config).get("max_seq_length") or limit))
    return max(1, min(limit, MAX_SEQ_LEN))


def load_hf_teacher(folder: Path, *, task: str | None = None) -> Teacher:
    """Load a local transformers folder (or zip) as a teacher; raise typed errors on bad files.

    The task is ``task``, else config.json's ``kdq_task``, else ``classification`` /
    ``regression`` for a ``*ForSequenceClassification`` checkpoint, ``token_classification`` for a
    ``*ForTokenClassification`` one (NER: per-token logits, `data_tokens`), else ``embedding``
    (pooling from the sentence-transformers files, default mean).
    """
    from transformers import AutoConfig  # heavy: only HF models need it

    folder = _as_folder(Path(folder))
    _check_model_type(folder)
    weights = _weights_file(folder)
    stored = _check_safetensors(weights)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"config.json is not a valid transformers config: {exc}") from exc
    task_, pooling, normalize = _resolve_head(config, folder, task)
    _check_config_size(config, task_, stored)
    token_map, project = _load_extras(folder, config)
    if project is not None and task_ != "embedding":
        raise ModelFileError(f"config.json: kdq_output_dim is for embedding models, this one is {task_}")
    model_class = HFVisionEncoder if is_vision(config.model_type) else HFEncoder
    module = model_class(_load_backbone(folder, config, task_), task_, pooling, normalize,
                         token_map=token_map, project=project).eval()
    if isinstance(module, HFVisionEncoder):
        return _vision_teacher(module, folder, weights)
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
        classes=class_names(getattr(config, "id2label", None), module.output_dim, "config.json id2label")
        if task_ in ("classification", "token_classification") else None,
    )


def _vision_teacher(module: HFVisionEncoder, folder: Path, weights: Path) -> Teacher:
    """A ViT image classifier: images (C, H, W) in, normalised as its preprocessor_config.json says."""
    shape = image_shape(module.config)
    return Teacher(
        kind="hf", task=module.task, input_kind="image", input_shape=shape, output_dim=module.output_dim,
        config=module.config.to_dict(), module=module, source_dir=folder,
        num_parameters=sum(p.numel() for p in module.parameters()), size_bytes=weights.stat().st_size,
        classes=class_names(getattr(module.config, "id2label", None), module.output_dim, "config.json id2label")
        if module.task == "classification" else None,
        preprocessing=read_image_preprocessing(folder, shape))


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


def save_hf_model(module: HFEncoder, folder: Path, tokenizer: Any) -> Path:
    """Save as a transformers folder (safetensors) that `load_hf_teacher` loads back unchanged."""
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
