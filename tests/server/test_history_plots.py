"""The run folder's record: divergence flagged in history, plots a reader can use."""

import json
import math

import numpy as np
import pytest

from confide.server.history import (
    _run_title,
    diverged,
    plot_history,
    plot_partition,
    write_history,
)


def _rows(losses, eps=False):
    return [{"round": i + 1, "train_loss": v, "test_accuracy": 0.5, "test_loss": 1.0,
             "epsilon": 0.1 * (i + 1) if eps else None} for i, v in enumerate(losses)]


@pytest.mark.parametrize(("losses", "flagged"), [
    ([2.3, 1.2, 0.8], []),
    ([2.3, 40.0, 1e4], [2, 3]),         # exploding: 10x round 1's loss
    ([2.3, math.nan], [2]),             # NaN
    ([3e4, 7e3], [1, 2]),               # raw large-scale features: huge from round 1
])
def test_diverged_rounds(losses, flagged):
    rows = _rows(losses)
    assert [r["round"] for r in rows if diverged(r, rows[0])] == flagged


def test_history_marks_diverged_rounds_only(tmp_path):
    write_history(tmp_path, _rows([2.3, 1.0, 500.0]))
    saved = json.loads((tmp_path / "history.json").read_text())
    assert ["diverged" in r for r in saved] == [False, False, True]


def test_plots_have_a_title_and_an_accuracy_axis_from_zero(tmp_path):
    import matplotlib.image as mpimg

    (tmp_path / "config.toml").write_text(
        '[data]\ndataset = "digits"\nnum_clients = 7\npartition = "shards"\n'
        '[strategy]\nname = "fedprox"\n[privacy]\nmode = "central"\n')
    assert _run_title(tmp_path) == (f"{tmp_path.name}\ndigits (7 clients, shards), fedprox, "
                                    "DP central")
    rows = _rows([2.3, 1.0, 0.7], eps=True)
    for r, acc in zip(rows, [0.91, 0.915, 0.92], strict=True):
        r["test_accuracy"] = acc
    path = plot_history(tmp_path, rows)
    image = mpimg.imread(path)
    assert image.shape[1] > image.shape[0] * 2.5  # three panels: accuracy, loss, accuracy vs ε
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    part = plot_partition(tmp_path, [np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7])], y, 3,
                          client_names=["a", "b"], label_names=["x", "y", "z"])
    assert part.name == "partition.png" and mpimg.imread(part).size > 0


def test_accuracy_axis_is_not_zoomed(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = []
    real = matplotlib.axes.Axes.set

    def spy(self, **kw):
        if kw.get("ylabel") == "test accuracy":
            seen.append(kw.get("ylim"))
        return real(self, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set", spy)
    plot_history(tmp_path, _rows([2.3, 1.0]))
    assert seen and all(lim is not None and lim[0] == 0.0 for lim in seen)
