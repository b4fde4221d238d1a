"""Click-through (CTR) data: categorical vocabularies (OOV bucket, cap, hashing), recorded for the bundle."""

from __future__ import annotations

import zlib

import pytest

from worker.compression.errors import DatasetError
from worker.compression.io.data_vocab import encode
from worker.compression.io.datasets import load_dataset
from worker.compression.spec import DataSpec

ROWS = "site,price,device,label\na,1.0,x,1\nb,2.0,y,0\na,3.0,,1\nc,4,x,0\na,5,x,1\n"


def test_text_columns_become_ids_with_an_oov_bucket(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(ROWS)
    data = load_dataset(path)
    site, device = data.meta["categorical"]
    assert site["tokens"] == ["a", "b", "c"] and site["size"] == 4 and site["index"] == 0
    assert device["tokens"] == ["x", "", "y"]  # most frequent first, ties in string order; empty is a value
    assert data.inputs["x"][:, 0].tolist() == [1, 2, 1, 3, 1]  # ids 1.. for tokens
    assert data.inputs["x"][:, 1].tolist() == [1, 2, 3, 4, 5]  # numeric columns stay numbers
    assert data.meta["field"] == "ctr" and data.meta["categorical_columns"] == "site,device"
    assert encode(["b", "zzz"], site).tolist() == [2, 0]  # unseen: the out-of-vocabulary id 0


def test_cap_keeps_the_most_frequent_and_many_values_are_hashed(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(ROWS)
    data = load_dataset(path, DataSpec(max_categories=1))
    assert data.meta["categorical"][0]["tokens"] == ["a"]
    assert data.inputs["x"][:, 0].tolist() == [1, 0, 1, 0, 1]  # b and c past the cap: OOV
    hashed = load_dataset(path, DataSpec(hash_above=2, hash_buckets=7)).meta["categorical"][0]
    assert hashed["kind"] == "hash" and hashed["size"] == 7 and "tokens" not in hashed
    assert encode(["c"], hashed).tolist() == [zlib.crc32(b"c") % 7]


def test_named_columns_keep_their_text_and_typos_stay_errors(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("zip,price,label\n007,1,0\n7,2,1\n007,3,1\n")
    data = load_dataset(path, DataSpec(categorical_columns=["zip"]))
    assert data.meta["categorical"][0]["tokens"] == ["007", "7"]  # read as written, not as the number 7
    assert "categorical" not in load_dataset(path).meta  # numbers are not categories unless named
    path.write_text("a,b,label\n1,2,0\n3,oops,1\n5,6,0\n")
    with pytest.raises(DatasetError, match="'oops' is not a finite number"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="no categorical column 'nope'"):
        load_dataset(path, DataSpec(categorical_columns=["nope"]))


def test_eval_file_is_read_with_the_training_vocabulary(tmp_path):
    train, held = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text(ROWS)
    held.write_text("site,price,device,label\nc,1,new,0\nq,2,x,1\n")
    vocabs = load_dataset(train).meta["categorical"]
    data = load_dataset(held, vocabularies=vocabs)
    assert data.inputs["x"][:, 0].tolist() == [3, 0] and data.inputs["x"][:, 2].tolist() == [0, 1]
    held.write_text("price,site,device,label\n1,c,x,0\n2,a,x,1\n")
    with pytest.raises(DatasetError, match="column 'site' is feature 1"):
        load_dataset(held, vocabularies=vocabs)


def test_ctr_task_needs_binary_click_labels(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("site,price,label\na,1,0\nb,2,1\nc,3,2\n")
    with pytest.raises(DatasetError, match="task 'ctr' needs click labels of two classes"):
        load_dataset(path, DataSpec(task="ctr"))
    assert "field" not in load_dataset(path).meta  # three classes: a plain classification
