"""``MODEL_CARD.md``: what the bundle holds, how good it is against the teacher, what it was made
from (sha256 of the teacher and the data), the spec, the verdict and the model's limits."""

from __future__ import annotations

import json
from typing import Any


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def model_card(*, verdict: dict[str, Any], table: list[dict[str, Any]], metric: str, batch: int,
               inputs: dict[str, str], spec: dict[str, Any], preprocessing: dict[str, Any],
               data: dict[str, Any]) -> str:  # fmt: skip
    lines = [
        "# Model card",
        "",
        f"**Verdict: {verdict['verdict'].replace('_', ' ')}.** {verdict.get('headline', '')}",
        "",
    ]
    for r in verdict.get("reasons", []):
        lines.append(f"- `{r['code']}` ({r['severity'].replace('_', ' ')}): {r['message']}")
    lines += ["", "## Measured on the evaluation split", "",
              _row(["model", metric, "size (bytes)", f"p50 at batch {batch} (ms)"]), _row(["---"] * 4)]
    for row in table:
        p50 = next((b["p50_ms"] for b in row.get("latency", {}).get("batches", []) if b["batch"] == batch), None)
        value = row.get("metric", {}).get(metric)
        lines.append(_row([row["name"], "–" if value is None else f"{value:.4g}", f"{row.get('size_bytes') or 0:,}",
                           "–" if p50 is None else f"{p50:.3g}"]))
    lines += ["", "## How to use it", "",
              "```sh", "pip install onnxruntime numpy   # and pillow for images, tokenizers for text",
              "python predict.py <image files | rows.csv | texts.jsonl>   # or: --text \"…\"", "```", "",
              f"The model takes `{', '.join(preprocessing['input']['names'])}` "
              f"({preprocessing['input']['kind']}, per-sample shape {preprocessing['input']['shape']}); "
              "`preprocessing.json` lists every step from a raw input to it.", ""]
    if preprocessing.get("classes"):
        lines.append(f"Classes, in output order ({preprocessing.get('class_order')}): "
                     + ", ".join(f"`{c}`" for c in preprocessing["classes"][:50]))
        lines.append("")
    lines += ["## Made from", ""]
    lines += [f"- {name}: sha256 `{sha}`" for name, sha in inputs.items()]
    lines += [f"- data: {data.get('train', {}).get('samples', '?')} training and "
              f"{data.get('eval', {}).get('samples', '?')} evaluation samples", "",
              "## Limits", "",
              ("- Measured on the evaluation dataset given with the job; other data may differ." if "eval dataset" in inputs
               else "- Measured on the evaluation split held out from the uploaded data; other data may differ."),
              "- Latency is onnxruntime on the worker's CPU; another machine differs.",
              "- The student imitates the teacher: it inherits its errors and biases.", "",
              "<details><summary>The job's spec</summary>", "", "```json", json.dumps(spec, indent=2), "```", "",
              "</details>", ""]
    return "\n".join(lines)
