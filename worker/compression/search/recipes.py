"""The quantization recipes a search measures each finalist in, as method configs."""

from __future__ import annotations

from ..spec import (
    AutoQuantizationConfig,
    DynamicInt8Config,
    NoQuantizationConfig,
    QatConfig,
    QuantizationMethod,
    StaticInt8Config,
)

PER_TENSOR = "_per_tensor"
FUSED = "_fused"


def recipes_for(config: QuantizationMethod, input_kind: str) -> dict[str, QuantizationMethod]:
    """The quantized recipes each finalist is measured in (besides fp32), by name.

    ``auto``: dynamic and static int8 for vectors, static for images and signals (onnxruntime's
    dynamic path leaves Conv in float), dynamic for token models (static loses too much there);
    ``qat``: static int8 (the quantization-aware twin comes on top, see `qat_config_for`).
    Static and dynamic int8 of non-token models also come per tensor (``..._per_tensor``) when the
    config asks for per-channel weights: per-tensor scales are smaller and, for small Gemms, faster
    (``quantize.cpu_choices``: the digits MLP ran 0.53× fp32 per tensor, 0.69× per channel);
    the search measures both and keeps whichever pays. Token models under ``auto`` come fused too
    (``dynamic_int8_fused``: onnxruntime's transformer fusion first, ``quantize.fusion``), measured
    against the unfused, since which is faster depends on the CPU.
    """
    if isinstance(config, NoQuantizationConfig):
        return {}
    shared = config.model_dump(include={"max_metric_drop", "drop_mode"})
    if isinstance(config, AutoQuantizationConfig):
        dynamic, static = DynamicInt8Config(**shared), StaticInt8Config(**shared)
        base: list[QuantizationMethod] = {"tokens": [dynamic], "vector": [dynamic, static]}.get(input_kind, [static])
    elif isinstance(config, QatConfig):
        base = [StaticInt8Config(calibration_samples=config.calibration_samples, per_channel=config.per_channel,
                                 **shared)]
    else:
        base = [config]
    out: dict[str, QuantizationMethod] = {}
    for c in base:
        out[c.method] = c
        if isinstance(c, (DynamicInt8Config, StaticInt8Config)) and c.per_channel and input_kind != "tokens":
            out[c.method + PER_TENSOR] = c.model_copy(update={"per_channel": False})
    if isinstance(config, AutoQuantizationConfig) and input_kind == "tokens":  # after transformer fusion too
        out[dynamic.method + FUSED] = dynamic.model_copy(update={"fuse_transformer": True})
    return out


def qat_config_for(config: QuantizationMethod) -> QatConfig:
    """The quantization-aware twin's config: ``config`` itself when it is ``qat``, else one with its
    tolerance and static calibration settings."""
    if isinstance(config, QatConfig):
        return config
    fields = config.model_dump(include={"max_metric_drop", "drop_mode", "calibration_samples", "per_channel"})
    return QatConfig(**fields)
