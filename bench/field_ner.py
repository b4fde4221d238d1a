"""Generated NER sentences and a small Hugging Face BERT token classifier trained on them in seconds
(offline: the config and the WordPiece vocabulary are built here, nothing is downloaded), shared by the
tests and `bench.fields` (case ``ner``), and the hand-written per-token KD peer for that case.

The sentences: templates ("{PER} works for {ORG} in {LOC} .") filled from word lists of people (one or
two words), organisations (one or two words) and places, tagged BIO (``B-PER``, ``I-PER``, ``B-ORG``,
``I-ORG``, ``B-LOC``, ``I-LOC``, ``O``). Some long names are two WordPieces in the vocabulary (``mar ##isol``),
so a word's tag sits on its first subword. Some names are a person, a place or a company ("jordan",
"lincoln", "ford") and a fifth of the entity words are made up (spelt letter by letter): only the context
tells. The teacher folder is what a team would upload: ``config.json``
(``BertForTokenClassification``, tags in ``id2label``) + ``model.safetensors`` + the tokenizer files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
FIRST = ("ada", "grace", "alan", "marisol", "kenji", "olusegun", "ingrid", "tomasz", "priya", "jordan",
         "lucia", "dmitri", "fatima", "henrik", "akosua", "mateo", "florence", "georgia", "paris")
LAST = ("lovelace", "hopper", "turing", "okafor", "tanaka", "novak", "sharma", "berg", "silva", "haddad",
        "lincoln", "ford", "washington")
ORG = (("acme",), ("globex",), ("initech",), ("umbrella", "labs"), ("stark", "industries"), ("wayne", "group"),
       ("hooli",), ("vandelay", "imports"), ("cyberdyne",), ("soylent", "corp"), ("ford",), ("lincoln", "labs"))
LOC = (("paris",), ("lagos",), ("kyoto",), ("oslo",), ("lima",), ("new", "delhi"), ("san", "jose"),
       ("cape", "town"), ("jordan",), ("valparaiso",), ("reykjavik",), ("nairobi",), ("florence",),
       ("georgia",), ("washington",), ("lincoln",))
"""Some words are in several lists (paris, jordan, florence, georgia, lincoln, ford, washington): only the
context tells a person from a place or a company."""
NOVEL = 0.2
"""The share of entity words replaced by a made-up name (letters the vocabulary spells one by one):
unseen by every model, so only the context and the letters tell its type."""
SYLLABLES = ("ka", "zu", "mi", "ro", "tan", "vel", "dor", "qui", "sha", "lek", "bo", "ny")
TEMPLATES = (
    "{PER} works for {ORG} in {LOC} .",
    "{PER} moved to {LOC} last year .",
    "the {ORG} office in {LOC} hired {PER} .",
    "{PER} and {PER} met at {ORG} .",
    "yesterday {PER} visited {LOC} with {PER} .",
    "{ORG} opened a lab in {LOC} .",
    "{PER} left {ORG} for {ORG} .",
    "shares of {ORG} rose after {PER} spoke in {LOC} .",
    "we flew from {LOC} to {LOC} on monday .",
    "nobody at {ORG} had met {PER} before .",
)
SPLIT_AFTER = 3
"""Words of 7 letters or more are two WordPieces: their first 3 letters and the rest."""


def _pieces(word: str) -> list[str]:
    return [word[:SPLIT_AFTER], "##" + word[SPLIT_AFTER:]] if len(word) >= 7 else [word]


def vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    words |= set(FIRST) | set(LAST) | {w for o in ORG for w in o} | {w for loc in LOC for w in loc}
    pieces = {p for w in words for p in _pieces(w)}
    pieces |= {c for c in "abcdefghijklmnopqrstuvwxyz"} | {"##" + c for c in "abcdefghijklmnopqrstuvwxyz"}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(pieces)]


def tokenizer() -> Any:
    """A BERT WordPiece tokenizer over `vocabulary` (fast: it maps subwords back to words)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={t: i for i, t in enumerate(vocabulary())})


def _entity(kind: str, rng: random.Random, novel: float) -> list[str]:
    if kind == "PER":
        words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
    else:
        words = list(rng.choice(ORG if kind == "ORG" else LOC))
    return [("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) if rng.random() < novel else w)
            for w in words]


def sentences(n: int, seed: int = 0, novel: float = NOVEL) -> list[dict[str, list[str]]]:
    """``n`` tagged sentences ``{"tokens": [...], "tags": [...]}``, ``novel`` of the entity words made up."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for part in rng.choice(TEMPLATES).split():
            if part.startswith("{"):
                kind = part[1:-1]
                words = _entity(kind, rng, novel)
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(part)
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode(tok: Any, rows: list[dict[str, Any]], max_length: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token inputs and labels: each word's tag index on its first subword, -100 elsewhere."""
    enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=max_length,
              padding="longest", return_tensors="pt")
    index = {t: i for i, t in enumerate(TAGS)}
    labels = []
    for i, r in enumerate(rows):
        seen, row = set(), []
        for w in enc.word_ids(i):
            row.append(-100 if w is None or w in seen else index[r["tags"][w]])
            seen.add(w)
        labels.append(row)
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, torch.tensor(labels)


def ner_config(**over: Any) -> Any:
    from transformers import BertConfig

    cfg = {"vocab_size": len(vocabulary()), "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 128, "num_labels": len(TAGS),
           "id2label": dict(enumerate(TAGS)), "label2id": {t: i for i, t in enumerate(TAGS)}, **over}
    return BertConfig(**cfg)


def ner_problem(folder: Path, *, sentences_n: int = 400, steps: int = 200, seed: int = 0, novel: float = NOVEL,
                **config: Any) -> dict[str, Path]:
    """``data.jsonl`` (``sentences_n`` sentences) and a BERT token classifier (``teacher/``) trained on as many
    other sentences for ``steps`` AdamW steps of batch 32 (lr 2e-3, linear decay); ``novel``: the share of
    made-up entity words (`NOVEL`)."""
    from transformers import BertForTokenClassification

    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "data.jsonl", sentences(sentences_n, seed, novel))
    tok = tokenizer()
    inputs, y = encode(tok, sentences(max(sentences_n, 400), seed + 1000, novel))
    torch.manual_seed(seed)
    model = BertForTokenClassification(ner_config(**config))
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        model.train()
        idx = torch.randint(0, len(y), (32,))
        logits = model(**{k: v[idx] for k, v in inputs.items()}).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    teacher = folder / "teacher"
    model.eval().save_pretrained(teacher)
    tok.save_pretrained(teacher)
    return {"teacher": teacher, "data": data}
