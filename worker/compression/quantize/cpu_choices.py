"""The CPU-specific choices of the onnxruntime quantizers (formats, signedness, ``reduce_range``, op
types), with the measurements behind them. Quantization-aware training simulates the same grid."""

from __future__ import annotations

from typing import Any

# Measured on this project's CPU (AMD EPYC, AVX2, no VNNI), onnxruntime 1.32, 1 thread, by
# bench/quantize.py (section "CPU choices"; latency = int8 p50 / fp32 p50, ranges over two runs on
# this shared machine). Without VNNI, MLAS multiplies u8 activations by s8 weights with VPMADDUBSW,
# whose int16 pair sums saturate; 7-bit weights (reduce_range) avoid that at no cost in speed,
# u8 weights (the u8u8 kernel) avoid it too but run slower.
# * static, QDQ u8 activations / s8 weights / reduce_range: digits-MLP logits off by 0.3-0.4 %
#   (mean relative error), random ResNet at 0.54-0.62× fp32 (batch 1 and 16). Full-range s8
#   weights: 4.9-5.0 % error (saturation) at the same speed; s8 activations (s8s8): the same error
#   and 1.06-1.25× (slower than fp32); u8u8: 0.3 % but 0.78-0.91×; QOperator instead of QDQ:
#   0.57-0.72× on the ResNet. Per-channel weights (spec default) cost small-batch Gemm time: the
#   digits MLP ran 0.69× at batch 1 against 0.53× per-tensor (≈ onnxruntime's default, 0.55×).
# * dynamic, s8 weights with reduce_range: MLP error 0.3-0.4 % vs 4.8-5.0 % full range, same speed;
#   u8 weights 0.2 % but 0.88-0.91× / 0.80-0.82× (batch 1 / 64) against 0.78-0.80× / 0.66-0.72×.
#   On all-MiniLM-L6-v2 (18-token sentences) reduce_range left the cosine at 0.991 and s8 ran 0.80×
#   against u8's 0.87×.
# A rerun on 2026-11-29 (less load) kept the same ranking with lower ratios: static QDQ u8s8
# reduce_range ResNet 0.33× (b1 and b16), digits MLP 0.69× / 0.34× (b1 / b64); s8s8 0.93× and
# u8u8 0.84× on the ResNet; dynamic s8 reduce_range 0.65× / 0.36× against u8u8's 0.76× / 0.80×.
CPU_CHOICES: dict[str, dict[str, Any]] = {
    "dynamic": {"weight_type": "QInt8", "reduce_range": True},
    "static": {"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
               "reduce_range": True},
    "weight_only": {"accuracy_level": 4, "is_symmetric": True},
}
"""``accuracy_level`` 4 lets MatMulNBits compute with int8 activations: at batch 1 it ran a
384×1536 MatMul at 0.42× (int4) / 0.58× (int8) of fp32, against 1.6× / 28× with level 0."""

DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
STATIC_OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
    "Resize", "Pad", "Split", "Slice",
]
"""Static QDQ op types. Left out on purpose: Add, Mul, Div, Where, Softmax, LayerNormalization,
Sigmoid: in transformers they carry the attention mask (≈ -3.4e38, which also breaks the histogram
calibrators) and the residual stream's outlier channels. Leaving Add out cost ResNet nothing
measurable: onnxruntime still fuses its residual adds into QLinearAdd (bench, CPU choices)."""
