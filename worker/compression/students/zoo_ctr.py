"""The zoo's click-through (CTR) family: an embedding table per categorical column beside the dense
features, then an MLP (``interaction: "concat"``), or DLRM's dot interaction (``"dot"``: the dense
features through one linear layer to the embedding width, then every pairwise dot product of those
vectors, with the dense vector, into the MLP).

Config keys (with ``architecture: "ctr"``, ``task``, ``output_dim`` — 2 click logits): ``input_dim``
(every feature, ids included), ``categorical`` (the vocabularies `io.data_vocab` records: each gives the
column's feature ``index`` and its id count ``size``; a teacher carries them so its data is read as it was
trained), ``embedding_dim``, ``hidden`` (MLP widths), ``interaction``, ``activation``.

The model takes what every table model takes: one float matrix ``x`` with the ids at their columns'
places; ids are cast to integers and clamped into their table (an id past it reads the last row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..types import ModelOutput

INTERACTIONS = ("concat", "dot")


def check_ctr(cfg: dict[str, Any]) -> None:
    """Raise SpecError naming what is wrong with a ``ctr`` config's categorical columns and options."""
    cats, width = cfg.get("categorical"), int(cfg["input_dim"])
    if not isinstance(cats, list) or not cats:
        raise SpecError("ctr: categorical must list the categorical columns (each with 'index' and 'size')")
    seen: set[int] = set()
    for c in cats:
        if not isinstance(c, dict) or not isinstance(c.get("index"), int) or not isinstance(c.get("size"), int):
            raise SpecError("ctr: each categorical column needs an integer 'index' and 'size'")
        if not 0 <= c["index"] < width or c["index"] in seen or c["size"] < 1:
            raise SpecError(f"ctr: categorical index {c['index']} must be a distinct feature below input_dim "
                            f"{width}, with size ≥ 1")
        seen.add(c["index"])
    if cfg.get("interaction", "concat") not in INTERACTIONS:
        raise SpecError(f"ctr: interaction must be one of {', '.join(INTERACTIONS)}")
    if int(cfg.get("embedding_dim", 16)) < 1:
        raise SpecError("ctr: embedding_dim must be at least 1")


class CTR(nn.Module):
    def __init__(self, cfg: dict[str, Any], act: nn.Module) -> None:
        super().__init__()
        check_ctr(cfg)
        cats = cfg["categorical"]
        dim = int(cfg.get("embedding_dim", 16))
        cat_index = [int(c["index"]) for c in cats]
        dense = [i for i in range(int(cfg["input_dim"])) if i not in set(cat_index)]
        self.register_buffer("cat_index", torch.tensor(cat_index, dtype=torch.long), persistent=False)
        self.register_buffer("cat_last", torch.tensor([int(c["size"]) - 1 for c in cats]), persistent=False)
        self.register_buffer("dense_index", torch.tensor(dense, dtype=torch.long), persistent=False)
        self.embeddings = nn.ModuleList(nn.Embedding(int(c["size"]), dim) for c in cats)
        self.dot = cfg.get("interaction", "concat") == "dot"
        if self.dot:
            self.bottom = nn.Linear(len(dense), dim) if dense else None
            n = len(cats) + (1 if dense else 0)
            rows, cols = torch.triu_indices(n, n, offset=1)
            self.register_buffer("pairs", rows * n + cols, persistent=False)
            features = len(self.pairs) + (dim if dense else 0)
        else:
            self.bottom = None
            features = len(dense) + len(cats) * dim
        dims = [features, *[int(h) for h in cfg.get("hidden", [])]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = act
        self.head = nn.Linear(dims[-1], int(cfg["output_dim"]))

    def interaction(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's input: dense features and embeddings, concatenated or dot-interacted."""
        x = x.flatten(1)
        ids = torch.minimum(x.index_select(1, self.cat_index).long().clamp(min=0), self.cat_last)
        vectors = [table(ids[:, j]) for j, table in enumerate(self.embeddings)]
        dense = x.index_select(1, self.dense_index)
        if not self.dot:
            return torch.cat([dense, *vectors], 1)
        lead = [self.act(self.bottom(dense))] if self.bottom is not None else []
        stacked = torch.stack(lead + vectors, 1)  # (B, n, dim)
        dots = (stacked @ stacked.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return torch.cat([*lead, dots], 1)

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        h = self.interaction(x)
        hidden = []
        for layer in self.layers:
            h = self.act(layer(h))
            hidden.append(h)
        return ModelOutput(self.head(h), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).output
