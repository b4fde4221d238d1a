"""An evaluation table is matched to the training table by column name, not by position."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from worker.compression.errors import DatasetError
from worker.compression.io.datasets import load_for_teacher
from worker.compression.io.teachers import load_teacher, save_zoo_model
from worker.compression.spec import DataSpec
from worker.compression.students import zoo

CFG = {"architecture": "mlp", "task": "classification", "input_dim": 3, "hidden": [8], "output_dim": 2}


@pytest.fixture()
def files(tmp_path):
    g = np.random.default_rng(0)
    frame = pd.DataFrame({"radius": g.normal(10, 2, 60), "texture": g.normal(0, 1, 60),
                          "area": g.normal(500, 50, 60)})
    frame["label"] = np.where(frame["radius"] > 10, "malignant", "benign")
    frame.to_csv(tmp_path / "train.csv", index=False)
    save_zoo_model(zoo.build(CFG).eval(), CFG, tmp_path / "teacher")
    return tmp_path, frame


def test_an_eval_table_in_another_column_order_is_read_in_the_training_order(files) -> None:
    folder, frame = files
    frame[["area", "label", "radius", "texture"]].to_csv(folder / "eval.csv", index=False)
    teacher = load_teacher(folder / "teacher")
    spec = DataSpec(label_column="label")
    _, evald, _ = load_for_teacher(folder / "train.csv", folder / "eval.csv", spec, teacher, "classification")
    expected = torch.tensor(frame[["radius", "texture", "area"]].to_numpy(np.float32))
    assert torch.allclose(evald.inputs["x"], expected)
    assert evald.meta["columns"] == ["radius", "texture", "area"] and evald.meta["columns_reordered"]


def test_an_eval_table_with_other_columns_is_refused_by_name(files) -> None:
    folder, frame = files
    frame.rename(columns={"area": "aera"}).to_csv(folder / "eval.csv", index=False)
    teacher = load_teacher(folder / "teacher")
    with pytest.raises(DatasetError, match=r"eval\.csv.*lacks 'area'.*training data has no 'aera'"):
        load_for_teacher(folder / "train.csv", folder / "eval.csv", DataSpec(label_column="label"), teacher,
                         "classification")
