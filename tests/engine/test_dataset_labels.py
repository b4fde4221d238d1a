"""Integer labels read with given class names, a misspelled label column, and a text label column
read as an input: what the upload's summary and the job's data say."""

from __future__ import annotations

import numpy as np
import pytest

from worker.compression.errors import DatasetError
from worker.compression.io.datasets import load_dataset
from worker.compression.io.validate import validate_dataset
from worker.compression.spec import CompressSpec, DataSpec


def _csv(path, labels, column="label"):
    rng = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{lab}" for (a, b), lab in zip(rng.normal(size=(len(labels), 2)), labels)]
    path.write_text(f"a,b,{column}\n" + "\n".join(rows) + "\n")
    return path


def test_one_based_labels_named_by_the_given_classes(tmp_path):
    """Wine's UCI labels 1, 2, 3 with classes=1,2,3: three classes, label k at the index of name "k"."""
    path = _csv(tmp_path / "wine.csv", [1, 2, 3, 3, 1, 2])
    summary = validate_dataset(path, DataSpec(classes=["1", "2", "3"]))
    assert summary["classes"] == ["1", "2", "3"] and summary["num_classes"] == 3
    data = load_dataset(path, DataSpec(classes=["1", "2", "3"]))
    assert data.y.tolist() == [0, 1, 2, 2, 0, 1]


def test_a_job_on_one_based_labels_with_their_classes_is_not_refused(tmp_path):
    """The submission check on the upload's summary: three classes, as the 3-output teacher predicts."""
    from service.api.jobcheck import check_job

    summary = validate_dataset(_csv(tmp_path / "wine.csv", [1, 2, 3, 2]), DataSpec(classes=["1", "2", "3"]))
    teacher = {"kind": "zoo", "task": "classification", "input_kind": "vector", "input_shape": [2], "output_dim": 3}
    spec = CompressSpec.model_validate({"data": {"classes": ["1", "2", "3"]}})
    assert check_job(spec, teacher, summary) == []
    four = validate_dataset(_csv(tmp_path / "four.csv", [0, 1, 2, 3]))
    assert [e.detail for e in check_job(CompressSpec(), teacher, four)] == [
        "the dataset has 4 classes but the teacher predicts 3"]


def test_permuted_integer_class_names_follow_their_names(tmp_path):
    order = ["0", "1", "2", "7", "4", "5", "6", "3", "8", "9", "10", "11"]
    labels = list(range(12)) * 3
    data = load_dataset(_csv(tmp_path / "d.csv", labels), DataSpec(classes=order))
    assert data.classes == order
    assert [data.classes[i] for i in data.y.tolist()] == [str(v) for v in labels]  # names match every row
    assert data.y.tolist()[3] == 7 and data.y.tolist()[7] == 3


def test_integer_labels_stay_indices_when_they_are_not_names(tmp_path):
    path = _csv(tmp_path / "d.csv", [0, 1, 2, 1])
    data = load_dataset(path, DataSpec(classes=["cat", "dog", "bird"]))
    assert data.classes == ["cat", "dog", "bird"] and data.y.tolist() == [0, 1, 2, 1]
    partly = load_dataset(_csv(tmp_path / "p.csv", [0, 1, 2]), DataSpec(classes=["1", "2", "3"]))
    assert partly.y.tolist() == [0, 1, 2]  # "0" is no name: all are indices
    assert load_dataset(path).classes == ["0", "1", "2"]


def test_integer_label_outside_the_classes_is_refused_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=r"label 3 is neither one of the classes \(cat, dog, bird\) nor an index"
                                           r".*0\.\.2.*count from 1, subtract 1") as err:
        load_dataset(_csv(tmp_path / "d.csv", [1, 2, 3, 2]), DataSpec(classes=["cat", "dog", "bird"]))
    assert err.value.row == 4  # the CSV line of the first label 3
    with pytest.raises(DatasetError, match="label 5 is neither") as err:
        load_dataset(_csv(tmp_path / "e.csv", [0, 5, 1]), DataSpec(classes=["cat", "dog", "bird"]))
    assert "count from 1" not in str(err.value)


def test_misspelled_label_column_names_the_close_column(tmp_path):
    path = _csv(tmp_path / "d.csv", [0, 1, 0])
    with pytest.raises(DatasetError, match=r"no label column 'labe'; did you mean 'label'\?; columns: a, b, label"):
        load_dataset(path, DataSpec(label_column="labe"))
    with pytest.raises(DatasetError, match=r"no label column 'zzz'; columns: a, b, label"):
        load_dataset(path, DataSpec(label_column="zzz"))


def test_text_label_column_read_as_input_warns_in_the_summary(tmp_path):
    path = _csv(tmp_path / "iris.csv", ["setosa", "virginica", "setosa", "versicolor"], column="species")
    summary = validate_dataset(path)
    assert summary["labelled"] is False
    assert "'species'" in summary["warning"] and "label_column=species" in summary["warning"]
    labelled = validate_dataset(path, DataSpec(label_column="species"))
    assert labelled["labelled"] is True and "warning" not in labelled
    other = validate_dataset(_csv(tmp_path / "c.csv", ["red", "blue", "red", "red"], column="colour"))
    assert "warning" not in other
