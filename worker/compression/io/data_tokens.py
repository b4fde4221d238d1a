"""Token classification (NER) data: JSON Lines of pre-split sentences with one tag per word.

Each line is ``{"tokens": ["Ada", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}``
(``ner_tags`` is read when there is no ``tags``, as Hugging Face datasets name it). Tags are names
(BIO / IOB2: ``B-PER``, ``I-PER``, ``O``) or integer indices into the teacher's ``id2label``.

Words are tokenized with the teacher's (fast) tokenizer, ``is_split_into_words``: a word's tag goes on
its first subword and every other position (special tokens, later subwords, padding) gets `IGNORE`
(-100), so ``y`` is ``(N, T)`` aligned with ``input_ids``. Tags are numbered in the teacher's order; a
tag the teacher does not know is refused by name (with the row), as is a sentence whose words and tags
differ in number. Words cut off by ``max_length`` lose their tags (counted in ``meta["truncated_words"]``).
Upload validation (``structure_only``, no tokenizer yet) parses the rows and keeps the word-level tags.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import DatasetError
from ..measure.entities import IGNORE
from ..types import TensorData
from .data_common import ReadContext

WORDS_KEY = "tokens"
TAG_KEYS = ("tags", "ner_tags")
MAX_WORDS = 4096
"""Words per sentence (a longer line is not a sentence)."""


def is_token_file(keys: Sequence[str], text_column: str) -> bool:
    """Rows with a ``tokens`` list (and no text column) are token classification data."""
    return WORDS_KEY in keys and text_column not in keys


def _words(value: Any, row: int) -> list[str]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{WORDS_KEY!r} must be a non-empty list of words", row=row)
    if len(value) > MAX_WORDS:
        raise DatasetError(f"{len(value):,} words in one sentence (at most {MAX_WORDS:,})", row=row)
    for word in value:
        if not isinstance(word, str) or not word.strip():
            raise DatasetError(f"every word in {WORDS_KEY!r} must be a non-empty string, not {word!r}", row=row)
    return list(value)


def _tag_key(keys: Sequence[str]) -> str:
    for key in TAG_KEYS:
        if key in keys:
            return key
    raise DatasetError(f"token classification rows need tags: a {' or '.join(map(repr, TAG_KEYS))} list "
                       f"beside {WORDS_KEY!r} (one tag per word)")


def tag_indices(tags: Sequence[Any], classes: Sequence[str], row: int) -> list[int]:
    """Tag names (or integer indices) as indices into ``classes``; an unknown tag is an error naming it."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for tag in tags:
        if isinstance(tag, int) and not isinstance(tag, bool):
            if not 0 <= tag < len(classes):
                raise DatasetError(f"tag index {tag} is outside the teacher's {len(classes)} tags", row=row)
            out.append(tag)
        elif isinstance(tag, str) and tag in index:
            out.append(index[tag])
        elif isinstance(tag, str):
            known = ", ".join(classes[:20]) + (", …" if len(classes) > 20 else "")
            raise DatasetError(f"unknown tag {tag!r}: the teacher's tags (config.json id2label) are {known}",
                               row=row)
        else:
            raise DatasetError(f"a tag must be a string or an integer index, not {tag!r}", row=row)
    return out


def _classes_of(all_tags: list[list[Any]], given: Sequence[str] | None) -> list[str]:
    if given is not None:
        return list(given)
    if all(isinstance(t, int) and not isinstance(t, bool) for tags in all_tags for t in tags):
        top = max((t for tags in all_tags for t in tags), default=0)
        return [str(i) for i in range(top + 1)]
    names = {t for tags in all_tags for t in tags if isinstance(t, str)}
    return sorted(names, key=lambda t: (t != "O", t[2:], t))  # O first, then B-/I- of each type together


def align_tags(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """One label per token position: the word's tag on its first subword, `IGNORE` elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(tags[word] if word is not None and word != previous else IGNORE)
        previous = word
    return labels


def load_token_records(records: list[dict[str, Any]], row_of: Callable[[int], int], ctx: ReadContext,
                       source: str) -> TensorData:
    """Sentences of ``records`` as token inputs and aligned per-token labels (module doc)."""
    if not records:
        raise DatasetError(f"{source} holds no rows")
    if ctx.tokenizer is None and not ctx.structure_only:
        raise DatasetError("token classification data needs a teacher with a tokenizer")
    if ctx.task not in (None, "token_classification"):
        raise DatasetError(f"{source} holds tagged words (token classification) but the job's task is {ctx.task}")
    key = _tag_key(list(records[0]))
    sentences, raw_tags = [], []
    for i, record in enumerate(records):
        words = _words(record.get(WORDS_KEY), row_of(i))
        tags = record.get(key)
        if not isinstance(tags, list) or len(tags) != len(words):
            got = f"{len(tags)} tags" if isinstance(tags, list) else f"{key!r} is {type(tags).__name__}"
            raise DatasetError(f"{len(words)} words but {got}: give one tag per word", row=row_of(i))
        sentences.append(words)
        raw_tags.append(tags)
    classes = _classes_of(raw_tags, ctx.spec.classes)
    tags = [tag_indices(t, classes, row_of(i)) for i, t in enumerate(raw_tags)]
    meta: dict[str, Any] = {"labels": "per_word", "tags_key": key, "words": sum(map(len, sentences)),
                            "tokenized": not ctx.structure_only}
    texts = [" ".join(words) for words in sentences]
    if ctx.structure_only:  # word-level tags, padded: what validation can say before a tokenizer is known
        width = max(map(len, tags))
        y = torch.full((len(tags), width), IGNORE, dtype=torch.long)
        for i, t in enumerate(tags):
            y[i, : len(t)] = torch.tensor(t)
        empty = torch.zeros((len(tags), 0), dtype=torch.long)
        return TensorData({"input_ids": empty, "attention_mask": empty.clone()}, y, "tokens", classes, texts, meta)
    inputs, y, lost = tokenize_words(ctx.tokenizer, sentences, tags, _max_length(ctx))
    meta["truncated_words"] = lost
    return TensorData(inputs, y, "tokens", classes, texts, meta)


def _max_length(ctx: ReadContext) -> int:
    if ctx.input_shape and ctx.input_shape[0] > 0:
        return min(ctx.spec.max_length, ctx.input_shape[0])
    return ctx.spec.max_length


def tokenize_words(tokenizer: Any, sentences: list[list[str]], tags: list[list[int]] | None, max_length: int
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:  # fmt: skip
    """Token tensors (padded to the longest sentence), the aligned labels, and how many tagged words
    truncation (or a tokenizer that makes no token of them) dropped."""
    if not getattr(tokenizer, "is_fast", False):
        raise DatasetError("token classification needs the teacher's fast tokenizer (a tokenizer.json) to map "
                           "subwords back to words")
    try:
        enc = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length,
                        padding="longest", return_tensors="pt")
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"the teacher's tokenizer cannot read pre-split words: {exc}") from exc
    inputs = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if tags is None:
        return inputs, None, 0
    rows, lost = [], 0
    for i, t in enumerate(tags):
        labels = align_tags(enc.word_ids(i), t)
        lost += len(t) - sum(1 for v in labels if v != IGNORE)
        rows.append(labels)
    return inputs, torch.tensor(rows, dtype=torch.long), lost
