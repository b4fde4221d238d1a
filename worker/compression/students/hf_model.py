"""Hugging Face transformers encoders (BERT family) as engine models: `HFEncoder`.

`HFEncoder` wraps the transformers backbone so that every model answers the engine's
conventions (``model(**inputs)`` and ``forward_features``) for three tasks:
classification / regression (the backbone's sequence-classification head, logits) and
embedding (mean or CLS pooling of the last hidden state, optionally L2-normalised).
Attention always runs in the "eager" implementation: it is the one that returns
attention probabilities (for attention distillation) and it exports to ONNX.

Shrunk students (``hf_vocab``, ``hf_narrow``) may carry two extras beside the backbone: a
``token_map`` (tokenizer id -> row of a trimmed word-embedding table, so the original tokenizer
still applies) and a ``project`` linear layer (a narrowed embedding model's pooled output back to
the teacher's width). Reading and writing model folders is `io.hf_folder`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, UnsupportedFormatError
from ..types import TOKEN_KEYS, ModelOutput, Task, Teacher

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "mpnet")
NO_TOKEN_TYPES = frozenset({"distilbert", "mpnet"})
HAS_POOLER = frozenset({"bert", "roberta", "xlm-roberta", "mpnet"})
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "mpnet"})
"""Position ids of these models start at ``pad_token_id + 1``."""
FFN = {"distilbert": ("ffn.lin1", "ffn.lin2", "hidden_dim"), "vit": ("mlp.fc1", "mlp.fc2", "intermediate_size")}
FFN_DEFAULT = ("intermediate.dense", "output.dense", "intermediate_size")
"""(FFN input linear, FFN output linear, config key of the FFN width) inside one encoder layer."""


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
        if task not in ("classification", "regression", "embedding", "token_classification"):
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
        return self.config.model_type not in NO_TOKEN_TYPES and segments > 1

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


def init_kwargs(model_type: str, task: str) -> dict[str, Any]:
    """Embedding backbones are built without the (unused) pooler where the model has one."""
    return {"add_pooling_layer": False} if task == "embedding" and model_type in HAS_POOLER else {}


def encoder_of(teacher: Teacher) -> HFEncoder:
    if not isinstance(teacher.module, HFEncoder):
        raise SpecError("this student needs a transformers (hf) teacher")
    return teacher.module


def hf_layer_count(teacher: Teacher) -> int:
    """Number of encoder layers of an hf teacher."""
    return int(encoder_of(teacher).config.num_hidden_layers)


def build_like(enc: HFEncoder, config: Any, *, token_map: torch.Tensor | None = None,
                project: nn.Linear | None = None) -> HFEncoder:
    """A freshly initialised model of the same classes (HFEncoder or a subclass), task and pooling for ``config``."""
    config._attn_implementation = "eager"
    try:
        backbone = type(enc.backbone)(config, **init_kwargs(config.model_type, enc.task))
    except (ValueError, TypeError, KeyError) as exc:
        raise SpecError(f"bad transformers config for the student: {exc}") from exc
    return type(enc)(backbone, enc.task, enc.pooling, enc.normalize, token_map=token_map, project=project).eval()
