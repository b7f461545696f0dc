import numpy as np
import pytest

from confide.exceptions import DataError
from confide.simulations import datasets
from confide.simulations.datasets import load_dataset


def test_digits():
    d = load_dataset("digits", seed=0)
    assert d.x_train.shape[1:] == (64,) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist")
def test_fashion_mnist():
    d = load_dataset("fashion-mnist", seed=0)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(d.y_train)) == list(range(10))


def test_fashion_mnist_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", seed=0)


def test_heart_disease_is_four_hospitals():
    d = load_dataset("heart-disease", seed=0, test_fraction=0.3)
    assert d.client_names == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert sorted(np.unique(d.natural_clients)) == [0, 1, 2, 3]
    assert d.num_classes == 2
    assert np.isfinite(d.x_train).all() and np.isfinite(d.x_test).all()
    assert len(d.y_train) + len(d.y_test) == 920


def test_user_csv_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    csv = tmp_path / "mine.csv"
    lines = ["f1,f2,client_id,label"]
    for i in range(60):
        lines.append(f"{rng.normal()},{rng.normal()},site{i % 3},{'yes' if i % 2 else 'no'}")
    csv.write_text("\n".join(lines) + "\n")
    d = load_dataset("ignored", seed=0, path=str(csv))
    assert d.num_classes == 2 and d.x_train.shape[1] == 2
    assert sorted(np.unique(d.natural_clients)) == [0, 1, 2]

    npz = tmp_path / "mine.npz"
    np.savez(npz, x=rng.normal(size=(40, 3)), y=rng.integers(0, 3, 40),
             client_id=np.repeat([0, 1], 20))
    d2 = load_dataset("ignored", seed=0, path=str(npz))
    assert d2.x_train.shape[1:] == (3,) and d2.natural_clients is not None


@pytest.mark.parametrize("content", ["not,a\n1,2\n", "label\n"])
def test_bad_user_files(tmp_path, content):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError):
        load_dataset("x", seed=0, path=str(p))


def test_pickled_npz_is_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x=np.array([object()], dtype=object), y=np.array([1]))
    with pytest.raises(DataError):
        load_dataset("x", seed=0, path=str(p))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; available"):
        load_dataset("mnist", seed=0)


def test_digits_read_without_sklearn_matches_load_digits():
    """The embedded digits are read from scikit-learn's CSV without importing it; the arrays
    are exactly what sklearn's own loader returns."""
    from sklearn.datasets import load_digits

    from confide.simulations.datasets import _digits_arrays

    data, target = _digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(data, bunch.data)
    np.testing.assert_array_equal(target, bunch.target)
