"""Rotated QSGD into a narrow field (confide.field_quantisation) and its secure sum: the stated
bounds of decode(encode(x)) and of the modular sum, the overflow bound, exact limbs, and the
secure aggregator running the whole protocol at 8 bits."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from confide_testing import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.config import load_config
from confide.exceptions import ConfigError
from confide.field_quantisation import (
    FieldQuantiser,
    RandomRotation,
    field_scale,
    from_limb_sums,
    hadamard,
    limb_bits,
    overflow_bound,
    to_limbs,
)
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.privacy.secagg.compressed import field_quantiser
from confide.round import ResultBatch, column

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clip(x: torch.Tensor, c: float) -> torch.Tensor:
    x = x.double()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x * torch.clamp(c / torch.clamp(norms, min=1e-300), max=1.0)


def test_hadamard_is_the_normalised_sylvester_matrix():
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(hadamard(x), x @ h.T / 4.0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.zeros(1, 12))


@PROPS
@given(dim=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_rotation_is_orthogonal_for_any_length(dim, seed):
    rot = RandomRotation(dim, seed)
    x = torch.randn(2, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = rot.forward(x)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), torch.linalg.vector_norm(x, dim=1))
    assert torch.allclose(rot.inverse(y), x, atol=1e-12)
    assert torch.equal(RandomRotation(dim, seed).forward(x), y)  # shared: same seed, same R


@PROPS
@given(dim=st.integers(2, 400), n=st.integers(1, 20), scale=st.floats(0.01, 10.0),
       seed=st.integers(0, 2**31))
def test_decode_of_encode_within_the_stated_bound(dim, n, scale, seed):
    clip = 1.5
    fq = FieldQuantiser(bits=8, dim=dim, clip_norm=clip, num_clients=n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scale / math.sqrt(dim)
    factors = torch.rand(n, generator=gen, dtype=torch.float64)
    codes = fq.codes(x, client_ids=list(range(n)), factors=factors)
    assert int(codes.abs().max()) <= 127
    want = _clip(x, clip) * factors[:, None]
    y = fq.rotation.forward(want) / fq.gamma
    # one client never saturates: its bound is the sum's with n = 1, far below delta
    assert bool((y.abs() < 127).all())
    assert float((codes - y).abs().max()) < 1  # every code within one step, in R's frame
    err = torch.linalg.vector_norm(fq.decode(codes) - want, dim=1)
    assert bool((err < fq.gamma * math.sqrt(dim)).all())  # ||eps||_2 < gamma sqrt(d)


def test_decode_of_encode_is_unbiased():
    dim, reps = 64, 4000
    fq = FieldQuantiser(bits=8, dim=dim, clip_norm=1.0, num_clients=10, seed=5)
    x = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x / torch.linalg.vector_norm(x) * 0.9
    codes = fq.codes(x.expand(reps, dim), client_ids=list(range(reps)))
    mean = fq.decode(codes).mean(dim=0)
    # each coordinate's rounding has variance <= gamma^2 / 4: 5 standard errors
    assert float((mean - x[0]).abs().max()) < 5 * fq.gamma / 2 / math.sqrt(reps)
    assert fq.gamma < 0.2  # the test is not vacuous: one step is far above that tolerance


@PROPS
@given(dim=st.integers(2, 300), n=st.integers(2, 30), seed=st.integers(0, 2**31),
       aligned=st.booleans())
def test_modular_sum_decodes_to_the_sum_within_bound_when_it_fits(dim, n, seed, aligned):
    clip = 1.0
    fq = FieldQuantiser(bits=8, dim=dim, clip_norm=clip, num_clients=n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    if aligned:  # the worst case of the bound: every client at the clip, one direction
        x = x[:1].expand(n, dim)
    ids = list(range(100, 100 + n))
    codes = fq.codes(x, client_ids=ids)
    words = fq.embed(codes)
    assert int(words.min()) >= 0 and int(words.max()) < 256
    modular = words.sum(dim=0) % 256
    total = fq.decode_sum(modular)
    true_codes = codes.sum(dim=0)
    assert fq.wrapped(true_codes) == 0  # fails with probability <= 2^-20 (the stated bound)
    assert torch.equal(fq.lift(modular), true_codes)  # the centred lift is the true sum
    err = float(torch.linalg.vector_norm(total - _clip(x, clip).sum(0)))
    assert err < n * fq.gamma * math.sqrt(dim)


def test_field_scale_meets_its_overflow_bound():
    for dim, n, bits in [(26122, 10, 8), (1000, 20, 8), (4097, 50, 12)]:
        gamma = field_scale(clip_norm=2.0, num_clients=n, dim=dim, bits=bits, delta=1e-6)
        p = overflow_bound(sum_norm=2.0 * n, dim=dim, gamma=gamma, bits=bits, num_clients=n)
        assert p == pytest.approx(1e-6, rel=1e-6)
        assert overflow_bound(sum_norm=1.0 * n, dim=dim, gamma=gamma, bits=bits,
                              num_clients=n) < p  # smaller sums, rarer overflow
    with pytest.raises(ConfigError, match="cannot sum 127 clients"):
        field_scale(clip_norm=1.0, num_clients=127, dim=10, bits=8)


def test_overflow_is_rare_at_the_bound_and_detected_below_it():
    # Worst case: all n clients send the same vector at the clip norm. At delta = 0.5 the
    # empirical frequency of a wrapped sum over fresh rotations stays below the bound;
    # with a step 8x finer than the bound allows, sums wrap, the simulation-only counter
    # sees it, and the decoded sum is far off.
    dim, n, clip, trials = 512, 10, 1.0, 60
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[:, 0] = clip  # a spike: the rotation must spread it
    wraps = 0
    for seed in range(trials):
        fq = FieldQuantiser(bits=8, dim=dim, clip_norm=clip, num_clients=n, seed=seed,
                            delta=0.5)
        wraps += fq.wrapped(fq.codes(x, client_ids=list(range(n))).sum(0)) > 0
    assert wraps / trials <= 0.5

    class Fine(FieldQuantiser):
        @property
        def gamma(self) -> float:
            return super().gamma / 8

    fine = Fine(bits=8, dim=dim, clip_norm=clip, num_clients=n, seed=3)
    codes = fine.codes(x, client_ids=list(range(n)))
    assert fine.wrapped(codes.sum(0)) > 0
    total = fine.decode_sum(fine.embed(codes).sum(0) % 256)
    assert float(torch.linalg.vector_norm(total - x.sum(0))) > 1.0


@PROPS
@given(n=st.integers(1, 25), bits=st.integers(8, 16), seed=st.integers(0, 2**31))
def test_limbs_carry_exact_sums_through_the_narrow_field(n, bits, seed):
    width = limb_bits(bits=bits, num_clients=n)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**32 - 1, (n, 4), generator=gen, dtype=torch.int64)
    limbs = to_limbs(values, width=width)
    sums = limbs.sum(dim=0)
    assert int(sums.max()) < 2**bits  # no limb sum wraps
    assert torch.equal(from_limb_sums(sums % 2**bits, width=width), values.sum(dim=0))


# ------------------------------------------------------------------ the secure sum at 8 bits

DIM = 300


def _config(n, *, extra=()):
    return load_config(None, [
        f"data.num_clients={max(n, 10)}", f"cohort.size={n}", "cohort.min_clients=2",
        "secure_aggregation.enabled=true", "secure_aggregation.max_weight=64",
        "compression.method='qsgd'", "compression.bits=8", "compression.error_feedback=false",
        "compression.clip_norm=1.0", "simulation.dropout_stage='share_keys'", *extra])


def _batch(x, ids, weights, losses):
    n = len(ids)
    return ResultBatch(client_ids=ids, updates=x.float(), num_examples=column(weights, "cpu"),
                       num_steps=column([3] * n, "cpu"),
                       metrics={"train_loss": column(losses, "cpu")})


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(5, 8), seed=st.integers(0, 2**16), rate=st.sampled_from([0.0, 0.25]),
       weighting=st.sampled_from(["examples", "uniform"]))
def test_secure_field_qsgd_sum_at_eight_bits(n, seed, rate, weighting):
    cfg = _config(n, extra=[f"simulation.dropout_rate={rate}"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen) * 0.05
    ids = sorted(torch.randperm(100, generator=gen)[:n].tolist())
    weights = torch.randint(1, 80, (n,), generator=gen).tolist()  # some above max_weight 64
    losses = (torch.rand(n, generator=gen) * 3).tolist()
    secure = SecureAggregator(cfg)
    agg = secure.aggregate(_batch(x, ids, weights, losses), server_round=4,
                           weighting=weighting)
    report = secure.last_report
    assert report is not None and report.bits == 8
    rows = [i for i, c in enumerate(ids) if c in set(agg.client_ids)]
    assert len(rows) == n - round(rate * n)
    # the coordinator's sum is exactly the decoded plaintext sum of the clients' codes
    fq = field_quantiser(cfg, dim=DIM, server_round=4)
    capped = [min(w, 64) for w in weights]
    factors = torch.tensor([w / 64 if weighting == "examples" else 1.0 for w in capped])
    codes = fq.codes(x.double(), client_ids=ids, factors=factors)
    assert fq.wrapped(codes[rows].sum(0)) == 0
    want = fq.decode(codes[rows].sum(0, keepdim=True)).reshape(-1)
    if weighting == "examples":
        want = want * 64
    assert torch.allclose(agg.update_sum.double(), want, atol=1e-5)
    # ... which is the weighted sum of the clipped updates, within n gamma sqrt(d) (times W)
    w = torch.tensor(capped if weighting == "examples" else [1] * n, dtype=torch.float64)
    plain = (_clip(x[rows], 1.0) * w[rows, None]).sum(0)
    unit = 64 if weighting == "examples" else 1
    assert float(torch.linalg.vector_norm(agg.update_sum.double() - plain)) < \
        unit * len(rows) * fq.gamma * math.sqrt(DIM)
    # weights and metadata are exact sums (limbs), never one client's value
    assert agg.weight_sum == float(w[rows].sum())
    meta = report.metadata
    assert meta["num_examples"] == sum(capped[i] for i in rows)
    assert meta["num_steps"] == 3 * len(rows)
    loss = sum(losses[i] * capped[i] for i in rows) / meta["num_examples"]
    assert meta["train_loss"] == pytest.approx(loss, abs=1e-3)
    # 8-bit words on the wire: the masked input is the vector, limbs and one word, 1 B each
    assert report.vector_length == DIM + 4 * math.ceil(32 / limb_bits(bits=8, num_clients=n)) + 1
    # and the same words without masks (the insecure path), bit for bit
    cfg2 = cfg.replace(secure_aggregation=dataclasses.replace(cfg.secure_aggregation,
                                                              skip_pairwise_masks=True))
    with pytest.warns(UserWarning):
        bare = SecureAggregator(cfg2)
    agg2 = bare.aggregate(_batch(x, ids, weights, losses), server_round=4, weighting=weighting)
    assert agg2.client_ids == agg.client_ids and torch.equal(agg2.update_sum, agg.update_sum)


def test_masked_input_is_a_quarter_of_the_float32_one():
    n, dim = 6, 16384
    x = torch.randn(n, dim) * 0.01
    ids, weights, losses = list(range(n)), [10] * n, [1.0] * n
    base = [f"data.num_clients={n}", f"cohort.size={n}", "secure_aggregation.enabled=true",
            "secure_aggregation.max_weight=64"]
    field = ["compression.method='qsgd'", "compression.bits=8",
             "compression.error_feedback=false", "compression.clip_norm=1.0"]
    sizes = {}
    for name, extra in [("field", field), ("float32", [])]:
        secure = SecureAggregator(load_config(None, [*base, *extra]))
        secure.aggregate(_batch(x, ids, weights, losses), server_round=1, weighting="examples")
        report = secure.last_report
        assert report is not None
        sizes[name] = (report.vector_length * report.bits / 8, sum(report.bytes_sent.values()))
    assert sizes["float32"][0] / sizes["field"][0] > 3.95  # 32-bit words vs 8-bit words
    assert sizes["field"][1] / n > sizes["field"][0]  # keys and shares are counted on top
    assert sizes["float32"][1] / sizes["field"][1] > 3.5


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["secure_aggregation.enabled=true", "compression.method='qsgd'",
          "compression.clip_norm=1.0"], "error_feedback = true cannot run"),
        (["compression.method='qsgd'", "compression.clip_norm=1.0"],
         "compression.clip_norm is for"),
        (["secure_aggregation.enabled=true", "compression.method='qsgd'", "compression.bits=4",
          "compression.error_feedback=false", "compression.clip_norm=1.0"],
         "compression.bits = 4"),
        (["secure_aggregation.enabled=true", "compression.method='qsgd'", "cohort.size=130",
          "data.num_clients=200", "compression.error_feedback=false",
          "compression.clip_norm=1.0"], "cannot sum 130 clients"),
    ],
)
def test_bad_field_settings_are_one_line(extra, fragment, capsys, tmp_path):
    args = ["simulate", *[a for kv in extra for a in ("--set", kv)], "-o", str(tmp_path / "n")]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert fragment in err
    assert not (tmp_path / "n").exists()
