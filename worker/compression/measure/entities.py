"""Token classification (NER) metrics: entity-level precision, recall and F1 (seqeval) and token accuracy.

Outputs are per-token logits ``(N, T, C)``; labels ``(N, T)`` hold a tag index on the first subword of
each word and `IGNORE` elsewhere (special tokens, later subwords, padding: `io.data_tokens`). Only the
labelled positions are read, so a word's tag is what the model predicts on its first subword, as the
Hugging Face token classification recipe scores it. Entities are spans of BIO / IOB2 tags read by
seqeval's default (CoNLL) scheme: a span is right only when its type and both ends are right.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SpecError

IGNORE = -100
"""The label of a position no tag is read from (PyTorch's cross-entropy ``ignore_index``)."""
ENTITY_METRICS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")


def labelled_positions(y: torch.Tensor) -> torch.Tensor:
    return y != IGNORE


def tag_sequences(pred: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> tuple[list[list[str]], ...]:
    """Per sentence, the true and the predicted tags of its words (labelled positions only)."""
    truth: list[list[str]] = []
    guess: list[list[str]] = []
    mask = labelled_positions(y)
    for row_pred, row_y, row_mask in zip(pred.tolist(), y.tolist(), mask.tolist(), strict=True):
        truth.append([classes[t] for t, m in zip(row_y, row_mask, strict=True) if m])
        guess.append([classes[p] for p, m in zip(row_pred, row_mask, strict=True) if m])
    return truth, guess


def entity_metrics(outputs: torch.Tensor, y: torch.Tensor, classes: Sequence[str] | None,
                   teacher: torch.Tensor | None = None) -> dict[str, Any]:
    """``entity_f1`` / ``entity_precision`` / ``entity_recall`` (micro over entities, seqeval) and
    ``token_accuracy`` over the labelled words; ``teacher_agreement``: the fraction of words on which the
    model and the teacher predict the same tag."""
    from seqeval.metrics import (  # heavy: only NER jobs need it
        f1_score,
        precision_score,
        recall_score,
    )

    if classes is None:
        raise SpecError("entity metrics need the tag names (the teacher's id2label)")
    if outputs.ndim != 3 or y.ndim != 2 or outputs.shape[:2] != y.shape:
        raise SpecError(f"token classification outputs {tuple(outputs.shape)} do not match labels {tuple(y.shape)}")
    pred = outputs.argmax(-1)
    mask = labelled_positions(y)
    words = int(mask.sum())
    truth, guess = tag_sequences(pred, y, list(classes))
    with warnings.catch_warnings():  # "no predicted entities" warnings: the scores are 0, as they should be
        warnings.simplefilter("ignore")
        out: dict[str, Any] = {
            "reference": "labels",
            "entity_f1": float(f1_score(truth, guess, zero_division=0)),
            "entity_precision": float(precision_score(truth, guess, zero_division=0)),
            "entity_recall": float(recall_score(truth, guess, zero_division=0)),
            "token_accuracy": float((pred[mask] == y[mask]).double().mean()) if words else 0.0,
        }
    if teacher is not None and teacher.shape == outputs.shape and words:
        out["teacher_agreement"] = float((pred[mask] == teacher.argmax(-1)[mask]).double().mean())
    return out


def sentence_disagreement(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Per sentence, how many of its labelled words (all positions without labels) the two models tag
    differently."""
    differ = student.argmax(-1) != teacher.argmax(-1)
    if y is not None:
        differ = differ & labelled_positions(y)
    return differ.sum(1)
