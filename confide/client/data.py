"""Where a client's training data comes from.

In deployment a client reads exactly one file, its own (:class:`LocalDataFile`): an ``.npz``
with arrays ``x`` (samples) and ``y`` (integer class labels), the user-data format of
``confide.simulations.datasets``, or a ``.csv`` with a label column and numeric features.
Labels are class indices and are never remapped, so every client agrees on them. In
simulation the data are the coordinator's partitions (:class:`PartitionedData`).
"""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from confide.exceptions import DataError

__all__ = ["ClientDataSource", "LocalDataFile", "PartitionedData", "read_data_file"]


def read_data_file(path: str | Path, *, label_column: str = "label"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(x, y)`` from a client's ``.npz`` or ``.csv`` file, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} not found")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:  # never unpickle a data file
                if "x" not in npz.files or "y" not in npz.files:
                    raise DataError(f"{str(p)!r} must hold arrays 'x' and 'y'")
                x, y = npz["x"], npz["y"]
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(p)!r} is not a readable .npz file ({exc})") from None
    elif p.suffix == ".csv":
        rows, columns = read_csv_table(p)
        if label_column not in columns:
            raise DataError(f"{str(p)!r} has no label column {label_column!r}")
        features = [c for c in columns if c != label_column]
        try:
            x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
            y = np.array([r[label_column] for r in rows]).astype(np.float64)
        except ValueError as exc:
            raise DataError(f"{str(p)!r}: values must be numeric ({exc})") from None
    else:
        raise DataError(f"data file {str(p)!r}: expected a .npz or .csv file")
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        raise DataError(f"{str(p)!r}: x and y must be numeric arrays")
    if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{str(p)!r}: x and y must be non-empty, y one-dimensional, and of "
                        "equal length")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{str(p)!r}: x holds NaN or infinite values")
    if not np.all(y == np.round(y)) or y.min() < 0:
        raise DataError(f"{str(p)!r}: y must hold class indices 0, 1, 2, ...")
    # Integer samples (other than uint8 pixels) are token ids for an embedding: kept.
    return input_array(x, source=repr(str(p))), y.astype(np.int64)


class ClientDataSource(ABC):
    """Gives a client its training arrays for a job."""

    @abstractmethod
    def arrays(self, *, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of this client."""

    def check(self, *, client_id: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Raise DataError if the data do not fit the job's model."""
        x, y = self.arrays(client_id=client_id)
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(f"{self.describe()}: samples have shape {tuple(x.shape[1:])}, but "
                            f"the job's model expects {tuple(input_shape)}")
        if int(y.max()) >= num_classes:
            raise DataError(f"{self.describe()}: label {int(y.max())} is out of range for the "
                            f"job's {num_classes} classes")

    def describe(self) -> str:
        """A short description for messages."""
        return type(self).__name__


class LocalDataFile(ClientDataSource):
    """A deployed client's own data file, read once."""

    def __init__(self, path: str | Path, *, label_column: str = "label") -> None:
        self.path = Path(path)
        self._x, self._y = read_data_file(self.path, label_column=label_column)

    def arrays(self, *, client_id: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        return self._x, self._y

    def describe(self) -> str:  # noqa: D102
        return f"data file {str(self.path)!r}"

    @property
    def num_examples(self) -> int:
        """How many samples the file holds."""
        return len(self._y)


class PartitionedData(ClientDataSource):
    """A simulation's pooled training arrays and per-client index partitions."""

    def __init__(self, x: np.ndarray, y: np.ndarray, partitions: list[np.ndarray]) -> None:
        self.x, self.y, self.partitions = x, y, partitions

    def arrays(self, *, client_id: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        if not 0 <= client_id < len(self.partitions):
            raise DataError(f"no partition for client {client_id}")
        idx = self.partitions[client_id]
        return self.x[idx], self.y[idx]

    def describe(self) -> str:  # noqa: D102
        return "simulation partition"


def read_csv_table(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and column names of a CSV file; an unreadable file is a one-line DataError."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{str(path)!r} is not a readable CSV file ({exc})") from None


def input_array(x: np.ndarray, *, source: str) -> np.ndarray:
    """Samples as the model gets them: integer ids stay int64, everything else float32.

    Integer arrays (other than ``uint8``, which is read as pixel values) are token or
    category ids for an embedding layer, so they are never cast to float.
    """
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        return x.astype(np.int64)
    if x.dtype.kind not in "fiub":
        raise DataError(f"{source}: x must be a numeric array (got dtype {x.dtype})")
    return x.astype(np.float32)
