"""How to read a dataset file (torch-free: the service validates upload options with it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from .base import SpecModel

Column = Annotated[str, StringConstraints(min_length=1, max_length=200)]
POLICY_ENVS = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")
"""Classic-control environments a policy's return is measured in (when gymnasium is installed)."""
FORECAST_KEYS = ("time_column", "target_columns", "feature_columns", "window", "horizon", "stride")
POLICY_KEYS = ("action_space", "action_columns", "env", "episodes")
MAX_CATEGORY_IDS = 1 << 24
"""Categorical ids travel as float32 features: exact below this."""


class DataSpec(SpecModel):
    """How to read a dataset file."""

    format: Literal["auto", "npz", "safetensors", "csv", "parquet", "jsonl", "text_csv", "image_zip",
                    "audio_zip"] = "auto"
    """The file's format; ``auto``: from its name and first bytes. JSON Lines whose rows hold ``tokens`` (a list
    of words) and ``tags`` (or ``ner_tags``: one tag per word) are token classification (NER) data."""
    label_column: str | None = None
    """Tables and JSON Lines: the column of labels (or regression targets). Default: a column named
    ``label`` (tables also ``target`` or ``y``); without one the data is unlabelled and every metric is
    agreement with the teacher."""
    text_column: str = "text"
    """Text (JSON Lines, text CSV): the column holding the text."""
    text_pair_column: str = "text_pair"
    """Text: the column of a pair's second text, when the task takes pairs."""
    max_length: int = Field(default=128, ge=4, le=4096)
    """Text: tokens per sample after the tokenizer (longer texts are cut)."""
    image_size: tuple[int, int] | None = None
    """(height, width) to resize images to; default: the teacher's input size."""
    image_scale: Literal["auto", "0-1", "0-255", "-1-1", "imagenet"] = "auto"
    """How pixels reach the teacher: in [0, 1], [0, 255], [-1, 1], or ImageNet's mean and std. ``auto``:
    the one under which the teacher agrees best with the labels (``0-1`` without labels); the choice is
    recorded in the job's preprocessing. ``image_mean`` / ``image_std`` override it."""
    image_mean: list[float] | None = Field(default=None, max_length=4)
    """Per-channel mean subtracted from pixels in [0, 1] (one value, or one per channel)."""
    image_std: list[float] | None = Field(default=None, max_length=4)
    """Per-channel standard deviation pixels in [0, 1] are divided by, after the mean."""
    grayscale: bool | None = None
    """Default: what the teacher's input takes (1 channel: grayscale; 3: RGB)."""
    classes: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        default=None, min_length=1, max_length=100_000)
    """Class names in the order of the teacher's outputs: labels that are names are numbered in this
    order. Integer labels are names too when every label's decimal text is one of these names (labels
    ``1, 2, 3`` with classes ``1,2,3``), else indices into them (0 … n-1; any other integer is refused). Default: the teacher's own names when it
    has them (a transformers ``id2label``, ONNX metadata ``classes``, a zoo config's ``classes``),
    else sorted; the job says which it used."""
    sample_rate: int = Field(default=16000, ge=1000, le=192_000)
    """Audio (``audio_zip``): clips are resampled to this rate (Hz)."""
    audio_length: int | None = Field(default=None, ge=16, le=192_000 * 60)
    """Audio: samples per clip, cut or zero-padded at the end. Default: what the teacher takes, else 1 s."""
    eval_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Without an eval dataset: the share of rows held out to evaluate on (a forecast's last windows)."""
    split_seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """The seed of that split (the same seed, the same rows)."""

    categorical_columns: list[Column] | None = Field(default=None, max_length=1000)
    """Tables: the columns read as categories (strings mapped to integer ids by a vocabulary built from the
    training file, `worker.compression.io.data_vocab`). Default: the columns where fewer than half the
    non-empty cells are numbers; ``[]``: none. A teacher trained with vocabularies (a zoo ``ctr``) uses its own."""
    max_categories: int = Field(default=10_000, ge=1, le=MAX_CATEGORY_IDS - 1)
    """Tables: a categorical column keeps its most frequent values up to this many; the rest (and values
    unseen in training) share one out-of-vocabulary id, 0."""
    hash_above: int = Field(default=100_000, ge=1, le=10**9)
    """Tables: a categorical column with more distinct values than this is hashed (CRC-32 of its UTF-8
    text, modulo ``hash_buckets``) instead of keeping a vocabulary."""
    hash_buckets: int = Field(default=65_536, ge=1, le=MAX_CATEGORY_IDS)
    """Tables: the ids of a hashed categorical column."""

    # --- fields of use (`worker.compression.fields`) ------------------------------------------
    task: Literal["forecasting", "policy", "ctr"] | None = None
    """A field of use the data is read for. ``forecasting``: a CSV / Parquet time series cut into
    windows (``window`` past steps of every column in ``target_columns`` + ``feature_columns``) whose
    targets are the next ``horizon`` steps of ``target_columns``; split in time order. ``policy``:
    logged observations (vectors) a policy maps to actions (``action_space``); its metric is agreement
    with the teacher, and the return in ``env`` when gymnasium is installed. ``ctr``: click (binary) labels
    on a table, judged by AUC (log-loss beside it); also chosen for a binary-labelled table with
    categorical columns."""
    time_column: Column | None = None
    """Forecasting: the column that orders the rows (numbers or dates). Unsorted rows are sorted by it
    (stable); a repeated time stamp is refused. Default: the rows' file order."""
    target_columns: list[Column] | None = Field(default=None, min_length=1, max_length=100)
    """Forecasting: the numeric series to forecast (each also an input)."""
    feature_columns: list[Column] | None = Field(default=None, max_length=1000)
    """Forecasting: further numeric input columns (covariates). Default: none."""
    window: int | None = Field(default=None, ge=1, le=10_000)
    """Forecasting: past steps per sample."""
    horizon: int | None = Field(default=None, ge=1, le=1000)
    """Forecasting: future steps per sample."""
    stride: int = Field(default=1, ge=1, le=10_000)
    """Forecasting: steps between window starts."""
    action_space: Literal["discrete", "continuous"] | None = None
    """Policy: the teacher's outputs are action logits (discrete) or actions (continuous)."""
    action_columns: list[Column] | None = Field(default=None, min_length=1, max_length=100)
    """Policy (CSV / Parquet): the logged action column(s), not inputs. Default: ``label_column``'s rule."""
    env: Literal["CartPole-v1", "Acrobot-v1", "Pendulum-v1"] | None = None
    """Policy: a gymnasium classic-control environment the teacher and student are rolled out in."""
    episodes: int = Field(default=10, ge=1, le=100)
    """Policy: episodes per model for the mean return (seeds 0 … episodes − 1)."""

    @model_validator(mode="after")
    def _field_options(self) -> DataSpec:
        """Options of one field given for another are refused: they would silently do nothing."""
        defaults = {k: DataSpec.model_fields[k].default for k in (*FORECAST_KEYS, *POLICY_KEYS)}
        if self.task != "forecasting":
            stray = [k for k in FORECAST_KEYS if getattr(self, k) != defaults[k]]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to task 'forecasting'")
        if self.task != "policy":
            stray = [k for k in POLICY_KEYS if getattr(self, k) != defaults[k]]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to task 'policy'")
        if self.task == "forecasting":
            missing = [k for k in ("target_columns", "window", "horizon") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"task 'forecasting' needs {', '.join(missing)}")
            if self.format not in ("auto", "csv", "parquet"):
                raise ValueError("task 'forecasting' reads a CSV or Parquet table")
            inputs = [*self.target_columns, *(self.feature_columns or [])]
            if len(set(inputs)) != len(inputs) or self.time_column in inputs:
                raise ValueError("target_columns, feature_columns and time_column must name different columns")
        if self.task == "policy" and self.action_space is None:
            raise ValueError("task 'policy' needs action_space: 'discrete' or 'continuous'")
        if self.env is not None and self.action_space is not None:
            want = "continuous" if self.env == "Pendulum-v1" else "discrete"
            if self.action_space != want:
                raise ValueError(f"{self.env} has a {want} action space")
        return self
