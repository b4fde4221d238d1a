"""The search's ladder of smaller BERT-family students: fewer layers, a narrower hidden width, a
trimmed vocabulary.

Three ways to shrink a transformers encoder, combined by `hf_ladder` into candidate students:

* **Layers** — `hf_derive.derive_hf_student` keeps evenly spaced teacher layers.
* **Vocabulary** — `hf_vocab.trim_vocabulary` keeps only the word-embedding rows of the tokens
  the data uses, behind a ``token_map`` so the original tokenizer still applies.
* **Hidden width** — `hf_narrow.narrow_hidden` (through ``derive_hf_student(hidden_size=...)``)
  keeps the most important residual dimensions and whole attention heads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..types import Teacher, TensorData, trim_padding
from .hf_derive import choose_layers, derive_hf_student
from .hf_model import HFEncoder, build_like, encoder_of, hf_layer_count
from .hf_narrow import head_size, narrowed_config
from .hf_vocab import kept_rows, position_shift, trim_vocabulary, used_token_ids
from .student import Student

CALIBRATION_SAMPLES = 256
"""Texts `hf_ladder` gives `narrow_hidden` (all-MiniLM-L6-v2, 3 layers, hidden 256: cosine to
the teacher before training 0.65 with 256 texts, 0.56 with 64, 0.37 with none)."""


@dataclass
class LadderEntry:
    name: str
    description: str
    num_parameters: int
    embedding_parameters: int
    """Parameters of the embedding tables (word, position, token type)."""
    layers: int
    hidden_size: int
    vocab_size: int
    build: Callable[[], Any]
    """Builds the student (a `student.Student`, kind ``hf``, how ``derived``)."""


def default_hidden_sizes(config: Any) -> list[int]:
    """The teacher's width, about 2/3 and 1/2 of it, as multiples of the head size (distinct)."""
    width, size = int(config.hidden_size), head_size(config)
    sizes = [width, *(max(size, round(width * f / size) * size) for f in (2 / 3, 1 / 2))]
    return sorted(set(sizes), reverse=True)


def count_student_parameters(enc: HFEncoder, *, layers: int, hidden_size: int, vocab_size: int,
                             position_shift: int = 0) -> tuple[int, int]:
    """(all, embedding-table) parameters of a student shaped so, from a meta-device build
    (``position_shift``: rows a trimmed RoBERTa-style model drops from its position table)."""
    config = copy.deepcopy(enc.config)
    config.num_hidden_layers = layers
    if hidden_size != int(config.hidden_size):
        config = narrowed_config(config, hidden_size)
    config.vocab_size = vocab_size
    config.max_position_embeddings = int(config.max_position_embeddings) - position_shift
    with torch.device("meta"):
        model = build_like(enc, config).backbone
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    out_dim = enc.output_dim
    if enc.task == "embedding" and (enc.project is not None or hidden_size != out_dim):
        total += hidden_size * out_dim + out_dim
    return total, embedding


def calibration_inputs(data: TensorData, n: int = CALIBRATION_SAMPLES, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded sample of ``n`` rows of ``data``'s token inputs, cut to their longest text."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[: min(n, len(data))]
    return trim_padding({k: v[idx] for k, v in data.inputs.items()})


def hf_ladder(teacher: Teacher, data: TensorData, *, layer_counts: Sequence[int] = (4, 3, 2),
              hidden_sizes: Sequence[int] | None = None, trim_vocab: bool = True,
              max_params: int | None = None) -> list[LadderEntry]:
    """Candidate students: every layer count × hidden size (default `default_hidden_sizes`),
    with the vocabulary trimmed to the tokens of ``data`` when ``trim_vocab``; largest first,
    none over ``max_params``. Counts come from meta-device builds; nothing is built until an
    entry's ``build()`` is called (layers evenly spaced, last kept; hidden dimensions and heads
    ranked on `CALIBRATION_SAMPLES` texts of ``data``; see `narrow_hidden`)."""
    enc = encoder_of(teacher)
    if teacher.input_kind != "tokens":
        raise SpecError(f"a search over {enc.config.model_type} students is not supported yet (its ladder narrows "
                        "text encoders); use student kind 'derived' or 'auto'")
    total_layers = hf_layer_count(teacher)
    counts = sorted({int(n) for n in layer_counts if 1 <= int(n) <= total_layers}, reverse=True)
    if not counts:
        raise SpecError(f"layer counts {list(layer_counts)} must be between 1 and the teacher's {total_layers}")
    sizes = sorted({int(h) for h in (hidden_sizes or default_hidden_sizes(enc.config))}, reverse=True)
    for h in sizes:
        if h != int(enc.config.hidden_size):
            narrowed_config(enc.config, h)  # raises on a size that cannot be built
    keep = used_token_ids(data, teacher.tokenizer) if trim_vocab else None
    unk = getattr(teacher.tokenizer, "unk_token_id", None)
    if keep is not None and unk is None:
        raise SpecError("the tokenizer has no UNK token: its vocabulary cannot be trimmed")
    vocab = enc.tokenizer_vocab_size
    trimmed_vocab, shift = None, 0
    if keep is not None:
        rows = kept_rows(enc, keep, int(unk))[1]
        trimmed_vocab, shift = int(rows.numel()), position_shift(enc, rows)
    calibration = calibration_inputs(data)

    entries: list[LadderEntry] = []
    for n in counts:
        for h in sizes:
            v = trimmed_vocab if trimmed_vocab is not None else int(enc.config.vocab_size)
            total, emb = count_student_parameters(enc, layers=n, hidden_size=h, vocab_size=v, position_shift=shift)
            if max_params is not None and total > max_params:
                continue
            kept = choose_layers(total_layers, None, n)
            vocab_text = f"vocabulary trimmed to {v:,} of {vocab:,} tokens" if keep is not None else \
                f"full vocabulary of {v:,} tokens"
            description = (f"{n} of {total_layers} layers {kept}, hidden {h} ({h // head_size(enc.config)} heads), "
                           f"{vocab_text}; {total:,} parameters, {emb / total:.0%} in embedding tables; "
                           "initialised from the teacher")
            name = f"hf-L{n}-H{h}" + ("-trimmed" if keep is not None else "")

            def build(n: int = n, h: int = h, description: str = description) -> Student:
                module, layer_map = _derive(teacher, n, h, calibration)
                if keep is not None:
                    module = trim_vocabulary(module, keep, unk_id=int(unk))
                n_params = sum(p.numel() for p in module.parameters())
                return Student(module, "hf", module.config.to_dict(), layer_map, description, n_params, "derived")

            entries.append(LadderEntry(name, description, total, emb, n, h, v, build))
    return sorted(entries, key=lambda e: (-e.num_parameters, -e.layers, -e.hidden_size))


def _derive(teacher: Teacher, layers: int, hidden: int, calibration: dict[str, torch.Tensor]
            ) -> tuple[HFEncoder, dict[int, int]]:
    width = int(encoder_of(teacher).config.hidden_size)
    return derive_hf_student(teacher, num_layers=layers, hidden_size=None if hidden == width else hidden,
                             calibration=calibration if hidden != width else None)


def embedding_share(module: nn.Module) -> float:
    """Fraction of the module's parameters in embedding tables."""
    total = sum(p.numel() for p in module.parameters())
    emb = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Embedding))
    return emb / total if total else 0.0
