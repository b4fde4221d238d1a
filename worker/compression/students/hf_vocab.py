"""Trimming a transformers student's vocabulary to the tokens the data uses.

`trim_vocabulary` keeps only the word-embedding rows of the tokens the data uses
(`used_token_ids`). The tokenizer is not touched: a ``token_map`` buffer (one int32 per
tokenizer id) sends kept ids to their new row and every other id to the UNK row, inside the
model (ONNX: one Gather), so the original tokenizer files still apply. On a corpus of
docstring sentences all-MiniLM-L6-v2 uses a few thousand of its 30,522 ids, and the word
table is 11.7 M of its 22.7 M parameters. Saved with `io.hf_folder.save_hf_model`, the token map
goes to ``kdq_extra.safetensors`` (no pickle); `io.hf_folder.load_hf_teacher` reads it back.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DatasetError, SpecError
from ..types import TensorData
from .hf_model import PADDING_OFFSET_POSITIONS, HFEncoder, build_like


def special_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokenizer's pad, unk, cls, sep, mask (and bos / eos) tokens."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}
    for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
                 "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def used_token_ids(data: TensorData, tokenizer: Any) -> list[int]:
    """Sorted ids that occur in ``data.inputs["input_ids"]`` where ``attention_mask`` is 1
    (everywhere without a mask), plus every special token id of ``tokenizer``."""
    ids = data.inputs.get("input_ids")
    if ids is None:
        raise DatasetError("the data has no input_ids: vocabulary trimming needs tokenized text")
    mask = data.inputs.get("attention_mask")
    real = ids if mask is None else ids[mask.to(torch.bool)]
    used = set(torch.unique(real).tolist())
    return sorted(used | set(special_token_ids(tokenizer)))


def trim_vocabulary(encoder: HFEncoder, keep_ids: Sequence[int], *, unk_id: int | None = None) -> HFEncoder:
    """A copy of ``encoder`` whose word-embedding table holds only the rows of ``keep_ids``.

    The copy still takes the original tokenizer's ids: its ``token_map`` sends each kept id to
    its row and every other id to the UNK row, so its outputs are identical to the original's
    for texts whose tokens are all kept. ``unk_id`` is the tokenizer's UNK id (needed unless
    the config names one, ``unk_token_id``); it and the config's pad / bos / eos ids are always
    kept; the copy's config names their new rows. RoBERTa-style models number positions
    from ``pad_token_id + 1``: when the pad row moves down by k, the position table loses its
    first k rows (`max_position_embeddings` - k), so every position reads the same vector.
    Trimming a trimmed encoder composes. The copy is in eval mode.
    """
    enc = encoder
    config = copy.deepcopy(enc.config)
    unk = unk_id if unk_id is not None else getattr(config, "unk_token_id", None)
    if unk is None:
        raise SpecError("trim_vocabulary needs the tokenizer's UNK id (unk_id=tokenizer.unk_token_id)")
    old_map, rows = kept_rows(enc, keep_ids, int(unk))
    new_row = torch.full((int(config.vocab_size),), -1, dtype=torch.long)
    new_row[rows] = torch.arange(rows.numel())
    token_map = new_row[old_map]
    token_map[token_map < 0] = new_row[old_map[int(unk)]]

    for key, row in config_rows(enc).items():  # rows of the current table -> rows of the new one
        setattr(config, key, int(new_row[row]))
    config.vocab_size = int(rows.numel())
    shift = position_shift(enc, rows)
    config.max_position_embeddings = int(config.max_position_embeddings) - shift
    table, positions = _word_embedding_key(enc), _position_embedding_key(enc)
    state = {k: (v[rows] if k == table else v[shift:] if k == positions else v).clone()
             for k, v in enc.backbone.state_dict().items()}
    out = build_like(enc, config, token_map=token_map.to(torch.int32), project=copy.deepcopy(enc.project))
    out.backbone.load_state_dict(state, strict=True)
    return out


def config_rows(enc: HFEncoder) -> dict[str, int]:
    """The config's pad / bos / eos ids: rows of the current embedding table (equal to tokenizer
    ids until a trim, which rewrites them as rows)."""
    rows = {}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(enc.config, key, None)
        if isinstance(value, int) and 0 <= value < int(enc.config.vocab_size):
            rows[key] = value
    return rows


def kept_rows(enc: HFEncoder, keep_ids: Sequence[int], unk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the current id -> row map, the ascending rows a trimmed table keeps): those of
    ``keep_ids`` and UNK, and the config's pad / bos / eos rows."""
    vocab = enc.tokenizer_vocab_size
    keep = torch.tensor(sorted({int(i) for i in keep_ids} | {int(unk)}))
    if int(keep[0]) < 0 or int(keep[-1]) >= vocab:
        raise SpecError(f"token ids to keep must be in 0..{vocab - 1}")
    old_map = enc.token_map.long() if enc.token_map is not None else torch.arange(vocab)
    specials = torch.tensor(sorted(config_rows(enc).values()), dtype=torch.long)
    return old_map, torch.unique(torch.cat([old_map[keep], specials]))


def position_shift(enc: HFEncoder, rows: torch.Tensor) -> int:
    """How far the pad row moves down in a table keeping ``rows``, for models whose positions
    start after the pad id (0 for the others)."""
    pad = config_rows(enc).get("pad_token_id")
    if enc.config.model_type not in PADDING_OFFSET_POSITIONS or pad is None:
        return 0
    return pad - int((rows < pad).sum())


def _position_embedding_key(enc: HFEncoder) -> str | None:
    return next((k for k in enc.backbone.state_dict() if k.endswith("embeddings.position_embeddings.weight")), None)


def _word_embedding_key(enc: HFEncoder) -> str:
    table = enc.backbone.get_input_embeddings()
    name = next(n for n, m in enc.backbone.named_modules() if m is table)
    return f"{name}.weight"
