"""The GPU path, checked on a real GPU: one short distillation and quantization-aware int8 run of
the same job on CUDA (bf16 autocast, as the engine trains on CUDA) and on the CPU, through the
engine's public ``compress()``; prints the training step time on each and the metric parity.

    python bench/gpu_check.py [--epochs 20] [--samples 20000] [--width 512]

Exits 2 with a clear message where there is no CUDA (this is not a CPU benchmark). Writes
``bench/out/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.compression.compress import compress
from worker.compression.spec import CompressSpec

try:  # the engine's layout after its restructure, then before it
    from worker.compression.io.teachers import save_zoo_model
    from worker.compression.students import zoo
except ImportError:  # pragma: no cover - depends on the engine's version
    from worker.compression import zoo  # type: ignore[no-redef]
    from worker.compression.teachers import save_zoo_model  # type: ignore[no-redef]

OUT = Path(__file__).resolve().parent / "out"
CLASSES = 10


def no_cuda_reason() -> str | None:
    if torch.version.cuda is None:
        return f"this torch build has no CUDA (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


def make_inputs(folder: Path, samples: int, features: int, width: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, samples)
    centers = rng.normal(size=(CLASSES, features)).astype(np.float32) * 2
    x = centers[y] + rng.normal(size=(samples, features)).astype(np.float32)
    data = folder / "data.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    config = {"architecture": "mlp", "task": "classification", "input_dim": features,
              "hidden": [width, width, width], "output_dim": CLASSES}  # fmt: skip
    torch.manual_seed(0)
    teacher = zoo.build(config)
    opt = torch.optim.Adam(teacher.parameters(), 1e-3)  # a teacher worth distilling: a few epochs
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(3):
        for i in range(0, samples, 512):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(teacher(xt[i : i + 512]), yt[i : i + 512]).backward()
            opt.step()
    src = save_zoo_model(teacher, config, folder / "teacher")
    archive = folder / "teacher.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f.name)
    return archive, data


def run(device: str, teacher: Path, data: Path, epochs: int, folder: Path) -> dict[str, Any]:
    spec = CompressSpec.model_validate({
        "student": {"kind": "auto", "max_params_ratio": 0.25},
        "distillation": {"epochs": epochs, "batch_size": 256, "baseline": False, "seed": 0, "device": device},
        "quantization": {"method": "qat", "qat_epochs": 2},
        "evaluation": {"latency_batch_sizes": [1], "warmup": 1, "repeats": 5},
    })  # fmt: skip
    started = time.perf_counter()
    result = compress(spec, teacher_path=teacher, dataset_path=data, output_dir=folder / f"out-{device}")
    wall = time.perf_counter() - started
    metrics = result.metrics
    train = ((metrics.get("distillation") or {}).get("train") or {}).get("student") or {}
    steps, seconds = train.get("steps") or 0, train.get("seconds") or 0.0
    summary = metrics.get("summary") or {}
    metric = summary.get("metric")
    models = {name: row.get(metric) for name, row in (summary.get("models") or {}).items()}
    return {"device": device, "wall_s": round(wall, 2), "train_steps": steps, "train_s": round(seconds, 3),
            "step_ms": round(1000 * seconds / steps, 3) if steps else None,
            "samples_per_s": train.get("samples_per_s"), "metric": metric, "models": models}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    if (why := no_cuda_reason()) is not None:
        print(f"gpu_check: no CUDA here ({why}); run it on a GPU host. Nothing was measured.", file=sys.stderr)
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher, data = make_inputs(folder, args.samples, args.features, args.width)
        rows = [run(device, teacher, data, args.epochs, folder) for device in ("cuda", "cpu")]
    cuda, cpu = rows
    print(f"{'device':<6} {'steps':>6} {'step ms':>9} {'samples/s':>11} {'wall s':>8}  {cuda['metric']} per model")
    for r in rows:
        per = ", ".join(f"{k} {v:.4f}" for k, v in r["models"].items() if isinstance(v, float))
        print(f"{r['device']:<6} {r['train_steps']:>6} {r['step_ms'] or 0:>9.3f} {r['samples_per_s'] or 0:>11.0f} "
              f"{r['wall_s']:>8.2f}  {per}")
    speedup = cpu["step_ms"] / cuda["step_ms"] if cuda["step_ms"] and cpu["step_ms"] else None
    parity = {k: round(cuda["models"][k] - cpu["models"][k], 4) for k in cuda["models"]
              if isinstance(cuda["models"].get(k), float) and isinstance(cpu["models"].get(k), float)}  # fmt: skip
    print(f"step time CPU/CUDA: {speedup:.2f}x" if speedup else "step time ratio: n/a")
    print(f"metric CUDA - CPU: {parity}")
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps({"runs": rows, "cpu_over_cuda_step": speedup,
                                                   "metric_cuda_minus_cpu": parity}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
