"""Generated images and a small Hugging Face ViT teacher trained on them in seconds (offline: the config is
built here, nothing is downloaded), shared by the tests and `bench.fields` (case ``vit``), and the
hand-written KD peer for that case.

The images: class folders of ``size``×``size`` RGB PNGs, four patterns (horizontal stripes, vertical
stripes, a checkerboard, a disc) in random colours and phases, with pixel noise. The teacher folder is
what a team would upload: ``config.json`` + ``model.safetensors`` (``ViTForImageClassification``, class
names in ``id2label``) + ``preprocessor_config.json`` (mean and std 0.5, ViT's usual).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("checker", "disc", "hstripes", "vstripes")
MEAN, STD = 0.5, 0.5


def pattern_images(n_per_class: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and their class indices (in `CLASSES` order)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for _ in range(n_per_class):
            period = rng.uniform(3, 7)
            phase = rng.uniform(0, period)
            if name == "hstripes":
                mask = ((yy + phase) % period) < period / 2
            elif name == "vstripes":
                mask = ((xx + phase) % period) < period / 2
            elif name == "checker":
                mask = (((yy + phase) // (period / 1.5)) + ((xx + phase) // (period / 1.5))) % 2 == 0
            else:
                cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.15, size * 0.35)]
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            img = np.where(mask[..., None], fg, bg) + rng.normal(0, 20, (size, size, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def image_zip(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A zip of class folders of PNGs, as a team would upload it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (img, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            zf.writestr(f"{CLASSES[int(label)]}/{i:04d}.png", buf.getvalue())
    return path


def as_inputs(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) normalised as the teacher's preprocessor says."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def vit_config(size: int, **over: Any) -> Any:
    from transformers import ViTConfig

    cfg = {"image_size": size, "patch_size": 4, "num_channels": 3, "hidden_size": 64, "num_hidden_layers": 6,
           "num_attention_heads": 4, "intermediate_size": 256, "num_labels": len(CLASSES),
           "id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}, **over}
    return ViTConfig(**cfg)


def vit_problem(folder: Path, *, size: int = 32, per_class: int = 120, steps: int = 300, seed: int = 0,
                **config: Any) -> dict[str, Path]:
    """``images.zip`` (``per_class`` images per class) and a ViT teacher folder (``teacher/``) trained on as
    many other images of the same classes for ``steps`` AdamW steps of batch 32, one-cycle learning rate up
    to 1e-3: the job's evaluation split is new to the teacher too."""
    from transformers import ViTForImageClassification

    folder.mkdir(parents=True, exist_ok=True)
    archive = image_zip(folder / "images.zip", *pattern_images(per_class, size, seed))
    images, labels = pattern_images(per_class, size, seed + 1000)  # the teacher's own, other images
    x, y = as_inputs(images), torch.from_numpy(labels).long()
    torch.manual_seed(seed)
    model = ViTForImageClassification(vit_config(size, **config))
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    for _ in range(steps):
        model.train()
        idx = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    teacher = folder / "teacher"
    model.eval().save_pretrained(teacher)
    (teacher / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [MEAN] * 3, "image_std": [STD] * 3}))
    return {"teacher": teacher, "data": archive}


def plain_vit_kd(teacher: Any, x: torch.Tensor, targets: torch.Tensor, *, num_layers: int, epochs: int,
                 out: Path) -> Path:
    """The hand-written peer: what one would write with transformers alone — a ViT of the teacher's config
    with ``num_layers`` layers, embeddings and evenly spaced layers copied from the teacher
    (DistilBERT-style), trained with AdamW on KL at T = 2 to the teacher's logits, batch 32, exported fp32
    with dynamic batch. ``teacher`` is the transformers model."""
    from transformers import ViTForImageClassification

    cfg = teacher.config.to_dict()
    total = cfg["num_hidden_layers"]
    kept = [round(i * (total - 1) / max(1, num_layers - 1)) for i in range(num_layers)]
    config = type(teacher.config).from_dict({**cfg, "num_hidden_layers": num_layers})
    net = ViTForImageClassification(config)
    state = teacher.state_dict()
    net.vit.embeddings.load_state_dict(teacher.vit.embeddings.state_dict())
    for i, t in enumerate(kept):
        net.vit.layers[i].load_state_dict(teacher.vit.layers[t].state_dict())
    net.vit.layernorm.load_state_dict(teacher.vit.layernorm.state_dict())
    net.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()
                                    if k.startswith("classifier.")})
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    torch.manual_seed(0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            logits = net(pixel_values=x[idx]).logits
            loss = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(targets[idx] / 2, -1),
                            reduction="batchmean") * 4
            opt.zero_grad()
            loss.backward()
            opt.step()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(pixel_values=x).logits

    torch.onnx.export(Logits().eval(), (x[:1],), str(out), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return out
