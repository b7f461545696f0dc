"""Compression in the round: the client stage, the residual as client state, bytes on the wire,
secure aggregation over compressed vectors, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from confide_testing import FAST, assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.app.simulate import run_simulation
from confide.client.compression import BYTES_UP_KEY, RESIDUAL_KEY, CompressionStage
from confide.client.pipeline import StageContext
from confide.compression import UpdateCodec
from confide.config import load_config
from confide.exceptions import ConfigError, RoundFailedError
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.round import ResultBatch, column, sum_batch

DIM = 40


def _contexts(ids, rnd, states=None):
    return [StageContext(server_round=rnd, client_id=c, seed=0,
                         state=(states or {}).get(c, {})) for c in ids]


@pytest.mark.parametrize("method", ["qsgd", "topk", "randk", "sign"])
def test_batched_stage_equals_per_client_stage(method):
    codec = UpdateCodec(method=method, bits=4, ratio=0.25, error_feedback=True, seed=3)
    stage = CompressionStage(codec, dim=DIM)
    x = torch.randn(5, DIM + 1)  # one extra column (adaptive clipping's indicator)
    ids = [4, 9, 1, 7, 2]
    state = {c: {RESIDUAL_KEY: torch.randn(DIM)} for c in ids}
    batch_ctx = _contexts(ids, 2, state)
    out = stage.batch(x, batch_ctx)
    for row, cid in enumerate(ids):
        ctx = _contexts([cid], 2, state)[0]
        one = stage(x[row], ctx)
        assert torch.equal(one, out[row])
        assert torch.equal(ctx.new_state[RESIDUAL_KEY], batch_ctx[row].new_state[RESIDUAL_KEY])
        assert ctx.info[BYTES_UP_KEY] == codec.wire_bytes(DIM) + 4
    assert torch.equal(out[:, DIM], x[:, DIM])  # passed through, never compressed


@pytest.mark.parametrize("method", ["qsgd", "topk", "randk", "sign"])
def test_residual_telescopes_across_rounds(method):
    """sum of what was sent + the last residual = sum of what was computed (Alg. 2)."""
    codec = UpdateCodec(method=method, bits=3, ratio=0.2, error_feedback=True, seed=1)
    stage = CompressionStage(codec, dim=DIM)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    sent = torch.zeros(DIM, dtype=torch.float64)
    computed = torch.zeros(DIM, dtype=torch.float64)
    for rnd in range(1, 8):
        u = torch.randn(DIM, generator=gen)
        ctx = StageContext(server_round=rnd, client_id=5, seed=0, state=state)
        sent += stage(u, ctx).double()
        computed += u.double()
        state = dict(ctx.new_state)
    assert torch.allclose(sent + state[RESIDUAL_KEY].double(), computed, atol=1e-4)


def _history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


@pytest.mark.slow
def test_bytes_on_the_wire_in_the_history(tmp_path):
    _, plain = run_simulation(None, overrides=[*FAST, "run.rounds=1"], output=tmp_path / "p")
    _, rk = run_simulation(None, overrides=[*FAST, "run.rounds=1",
                                            "compression.method='randk'"],
                           output=tmp_path / "r")
    _, q = run_simulation(None, overrides=[*FAST, "run.rounds=1", "compression.method='qsgd'"],
                          output=tmp_path / "q")
    dim = plain[0]["bytes_down"] // (4 * plain[0]["num_sampled"])
    n = plain[0]["num_clients"]
    codec = UpdateCodec(method="randk", ratio=0.1)
    assert plain[0]["bytes_up"] == n * 4 * dim
    assert rk[0]["bytes_up"] == n * 4 * codec.kept(dim)
    assert q[0]["bytes_up"] == n * (dim + 4)  # 8-bit codes and one float32 norm
    assert plain[0]["bytes_down"] == rk[0]["bytes_down"] == q[0]["bytes_down"]


@pytest.mark.slow
def test_residual_in_checkpoint_and_resume_continues_it(tmp_path):
    extra = ["run.rounds=4", "compression.method='randk'", "compression.ratio=0.2",
             "cohort.size=5"]
    full, _ = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / "full")
    part, _ = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / "part",
                             stop_after=2)
    ckpt = torch.load(part / "checkpoint.pt", weights_only=False)
    states = ckpt["client_states"]
    assert states and all(RESIDUAL_KEY in s for s in states.values())
    assert any(float(s[RESIDUAL_KEY].abs().sum()) > 0 for s in states.values())
    run_simulation(resume=part)
    assert (full / "history.json").read_text() == (part / "history.json").read_text()
    a = torch.load(full / "checkpoint.pt", weights_only=False)["client_states"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["client_states"]
    assert set(a) == set(b)
    assert all(torch.equal(a[c][RESIDUAL_KEY], b[c][RESIDUAL_KEY]) for c in a)


@pytest.mark.slow
def test_residual_kept_next_to_scaffold_state(tmp_path):
    run_dir, _ = run_simulation(None, overrides=[*FAST, "run.rounds=2",
                                                 "strategy.name='scaffold'",
                                                 "compression.method='randk'"],
                                output=tmp_path / "s")
    states = torch.load(run_dir / "checkpoint.pt", weights_only=False)["client_states"]
    keys = {frozenset(s) for s in states.values()}
    assert len(keys) == 1
    (only,) = keys
    assert RESIDUAL_KEY in only and len(only) >= 2  # the strategy's own state survives


@pytest.mark.slow
@pytest.mark.parametrize("method", ["randk", "qsgd", "qsgd-field"])
def test_secure_compressed_history_is_reproducible(tmp_path, method):
    codec = (["compression.method='qsgd'", "compression.clip_norm=2.0",
              "compression.error_feedback=false"] if method == "qsgd-field"
             else [f"compression.method='{method}'", "compression.scale=0.05"])
    extra = ["run.rounds=2", "secure_aggregation.enabled=true", *codec]
    a, ha = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / "a")
    b, _ = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / "b")
    assert (a / "history.json").read_text() == (b / "history.json").read_text()
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in ha)


@pytest.mark.slow
def test_vectorized_and_sequential_agree_with_compression(tmp_path):
    extra = ["run.rounds=2", "compression.method='qsgd'", "compression.bits=4"]
    _, seq = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / "s")
    _, vec = run_simulation(None, overrides=[*FAST, *extra,
                                             "simulation.executor='vectorized'"],
                            output=tmp_path / "v")
    assert [r["bytes_up"] for r in seq] == [r["bytes_up"] for r in vec]
    for r, s in zip(seq, vec, strict=True):
        assert abs(r["test_accuracy"] - s["test_accuracy"]) < 0.05


# ------------------------------------------------------------------ secure aggregation

def _secure(method, *, n, bits=32, dropout_stage="masked_input", dropout_rate=0.0, extra=()):
    cfg = load_config(None, [
        f"data.num_clients={max(n, 10)}", f"cohort.size={n}", "cohort.min_clients=2",
        "secure_aggregation.enabled=true", f"secure_aggregation.bits={bits}",
        "secure_aggregation.max_weight=50", "secure_aggregation.clipping_range=2.0",
        f"compression.method='{method}'", "compression.ratio=0.25", "compression.scale=1.0",
        f"simulation.dropout_stage='{dropout_stage}'", f"simulation.dropout_rate={dropout_rate}",
        *extra])
    return cfg, UpdateCodec.from_config(cfg)


def _batch(codec, x, ids, weights, rnd):
    stage = CompressionStage(codec, dim=x.shape[1])
    contexts = _contexts(ids, rnd)
    dense = stage.batch(x, contexts)
    return ResultBatch(client_ids=ids, updates=dense, num_examples=column(weights, "cpu"),
                       num_steps=column([1] * len(ids), "cpu"), info=[c.info for c in contexts])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 7), seed=st.integers(0, 2**16), rate=st.sampled_from([0.0, 0.2, 0.3]))
def test_secure_qsgd_sum_is_the_plaintext_sum_of_codes(n, seed, rate):
    # clients that leave after share_keys send no masked input: they are not in the sum
    cfg, codec = _secure("qsgd", n=n, dropout_stage="share_keys", dropout_rate=rate)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen) * 0.5
    ids = sorted(torch.randperm(100, generator=gen)[:n].tolist())
    weights = torch.randint(1, 60, (n,), generator=gen).tolist()  # some above max_weight
    batch = _batch(codec, x, ids, weights, rnd=3)
    agg = SecureAggregator(cfg).aggregate(batch, server_round=3, weighting="examples")
    included = set(agg.client_ids)
    assert len(included) == n - round(rate * n)
    rows = [i for i, c in enumerate(ids) if c in included]
    s = codec.levels
    codes = torch.round(batch.updates.double() * s / codec.scale).to(torch.int64)
    w = torch.tensor([min(weights[i], 50) for i in rows])
    want = (codes[rows] * w[:, None]).sum(dim=0)
    got = torch.round(agg.update_sum.double() * s / codec.scale).to(torch.int64)
    assert torch.equal(got, want)  # exact: integer codes summed in the field
    assert agg.weight_sum == float(w.sum())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 7), seed=st.integers(0, 2**16),
       stage=st.sampled_from(["share_keys", "masked_input"]))
def test_secure_randk_runs_over_the_shared_coordinates(n, seed, stage):
    cfg, codec = _secure("randk", n=n, dropout_stage=stage, dropout_rate=0.2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen) * 0.5
    ids = sorted(torch.randperm(100, generator=gen)[:n].tolist())
    batch = _batch(codec, x, ids, [1] * n, rnd=2)
    secure = SecureAggregator(cfg)
    agg = secure.aggregate(batch, server_round=2, weighting="uniform")
    assert secure.last_report is not None
    assert secure.last_report.vector_length < DIM  # k values (+ weight), not the dense vector
    idx = codec.shared_indices(DIM, server_round=2)
    off = torch.ones(DIM, dtype=torch.bool)
    off[idx] = False
    assert torch.equal(agg.update_sum[off], torch.zeros(int(off.sum())))
    rows = [i for i, c in enumerate(ids) if c in set(agg.client_ids)]
    plain = sum_batch(batch.select(rows), weighting="uniform")
    # on the support: the plaintext sum, to SecAgg's own fixed-point resolution
    resolution = 2.0 * 50 / ((2**31 - 1) // n)
    assert torch.allclose(agg.update_sum.double(), plain.update_sum.double(),
                          atol=n * resolution)
    # and the unmasked words equal the unmasked-by-design (insecure) path's, bit for bit
    cfg2 = cfg.replace(secure_aggregation=dataclasses.replace(cfg.secure_aggregation,
                                                              skip_pairwise_masks=True))
    with pytest.warns(UserWarning):
        bare = SecureAggregator(cfg2)
    agg2 = bare.aggregate(batch, server_round=2, weighting="uniform")
    assert agg2.client_ids == agg.client_ids
    assert torch.equal(agg2.update_sum, agg.update_sum)


def test_secure_randk_refuses_payloads_of_different_rounds():
    cfg, codec = _secure("randk", n=5)
    x = torch.randn(5, DIM)
    batch = _batch(codec, x, [1, 2, 3, 4, 5], [1] * 5, rnd=2)
    batch.info[0]["compression_round"] = 1  # one client started a round earlier (FedBuff)
    with pytest.raises(RoundFailedError, match="one shared support"):
        SecureAggregator(cfg).aggregate(batch, server_round=2, weighting="uniform")


def test_secure_qsgd_field_too_small_is_refused():
    with pytest.raises(ConfigError, match="too small for QSGD"):
        cfg, _ = _secure("qsgd", n=10, bits=16)
        SecureAggregator(cfg)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["secure_aggregation.enabled=true", "compression.method='topk'"], "'topk' cannot run"),
        (["secure_aggregation.enabled=true", "compression.method='sign'"], "'sign' cannot run"),
        (["compression.method='randk'", "compression.ratio=0"], "compression.ratio = 0"),
        (["compression.method='randk'", "compression.ratio=1.5"], "compression.ratio = 1.5"),
        (["compression.method='qsgd'", "privacy.mode='central'",
          "privacy.noise_multiplier=1.0"], "cannot run with privacy.mode = 'central'"),
        (["compression.method='randk'", "privacy.mode='distributed'"],
         "cannot run with privacy.mode = 'distributed'"),
        (["secure_aggregation.enabled=true", "compression.method='randk'",
          "strategy.name='fedbuff'", "strategy.buffer_size=3"], "under strategy 'fedbuff'"),
        (["secure_aggregation.enabled=true", "secure_aggregation.bits=16",
          "compression.method='qsgd'"], "too small for QSGD"),
    ],
)
def test_bad_compression_input_is_one_line(extra, fragment, capsys, tmp_path):
    args = ["simulate", *[a for kv in extra for a in ("--set", kv)], "-o", str(tmp_path / "n")]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert fragment in err
    assert not (tmp_path / "n").exists()


@pytest.mark.slow
def test_ledger_says_where_compression_sits(tmp_path):
    run_dir, history = run_simulation(None, overrides=[
        *FAST, "run.rounds=1", "privacy.mode='central'", "privacy.noise_multiplier=1.0",
        "compression.method='randk'", "compression.error_feedback=true"],
        output=tmp_path / "dp")
    settings_ = json.loads((run_dir / "privacy_ledger.json").read_text())["settings"]
    assert settings_["compression"].startswith("randk")
    assert "after client-level clipping" in settings_["compression_order"]
    assert "before the server's noise" in settings_["compression_order"]
    assert history[0]["epsilon"] is not None


def test_deployed_secure_aggregation_refuses_compression():
    from confide.server.secagg_transport import DeployedSecureAggregator

    cfg, _ = _secure("randk", n=5)
    with pytest.raises(ConfigError, match="simulation only"):
        DeployedSecureAggregator(cfg)


def test_secure_randk_words_travel_at_the_field_width():
    # the masked input is packed at secure_aggregation.bits: each of the k + 1 + meta words
    # costs 3 bytes at 24 bits, 4 at 32; every other protocol message is the same size
    n = 5
    x = torch.randn(n, DIM)
    sent = {}
    for bits in (24, 32):
        cfg, codec = _secure("randk", n=n, bits=bits)
        secure = SecureAggregator(cfg)
        secure.aggregate(_batch(codec, x, list(range(1, n + 1)), [1] * n, rnd=2),
                         server_round=2, weighting="uniform")
        report = secure.last_report
        assert report is not None and report.vector_length == codec.kept(DIM) + 1 + 3
        sent[bits] = report.bytes_sent
    for cid, nbytes in sent[32].items():
        assert nbytes - sent[24][cid] == codec.kept(DIM) + 1 + 3  # one byte less per word
