"""A client's own data file: formats and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from confide.client.data import LocalDataFile, read_data_file
from confide.exceptions import DataError


def test_npz_and_csv(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3)), y=np.array([0, 1, 2, 1, 0]))
    x, y = read_data_file(tmp_path / "d.npz")
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (5, 3)
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    x, y = read_data_file(tmp_path / "d.csv")
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.ones((3, 2))}, "'x' and 'y'"),
    ({"x": np.ones((3, 2)), "y": np.array([0, 1])}, "equal length"),
    ({"x": np.ones((3, 2)), "y": np.array([0.5, 1, 2])}, "class indices"),
    ({"x": np.ones((3, 2)), "y": np.array([-1, 1, 2])}, "class indices"),
    ({"x": np.full((3, 2), np.nan), "y": np.array([0, 1, 2])}, "NaN"),
])
def test_bad_npz_files(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        read_data_file(tmp_path / "d.npz")


def test_pickled_arrays_are_never_loaded(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="not a readable"):
        read_data_file(tmp_path / "d.npz")


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_data_file(tmp_path / "nope.npz")
    (tmp_path / "d.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="expected a .npz or .csv"):
        read_data_file(tmp_path / "d.txt")


def test_shape_and_labels_checked_against_the_job(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 6)), y=np.array([0, 1, 2, 9]))
    data = LocalDataFile(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"shape \(6,\).*expects \(64,\)"):
        data.check(client_id=0, input_shape=(64,), num_classes=10)
    with pytest.raises(DataError, match="label 9 is out of range"):
        data.check(client_id=0, input_shape=(6,), num_classes=5)
