"""Update compression: bounds from the papers, error feedback, sums under secure aggregation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.compression import (
    CompressedUpdate,
    UpdateCodec,
    check_field,
    check_secure_aggregation,
    count_bytes,
    field_bits_needed,
    field_levels,
)
from confide.config import load_config
from confide.exceptions import ConfigError, ProtocolError

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def vectors(min_dim=1, max_dim=64, rows=1):
    """Float32-representable vectors with a non-zero entry, as a [rows, dim] tensor."""
    elem = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    return st.integers(min_dim, max_dim).flatmap(
        lambda d: st.lists(st.lists(elem, min_size=d, max_size=d), min_size=rows, max_size=rows)
    ).map(lambda v: torch.tensor(v, dtype=torch.float32)).filter(lambda t: bool(t.abs().sum() > 0))


# --------------------------------------------------------------------------- QSGD


@PROPS
@given(x=vectors(max_dim=32), bits=st.sampled_from([2, 3, 4, 8]), rnd=st.integers(0, 10**6))
def test_qsgd_unbiased_and_within_lemma_3_1(x, bits, rnd):
    # Alistarh et al. 2017, Lemma 3.1: E[Q(v)] = v, E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s)||v||^2.
    codec = UpdateCodec(method="qsgd", bits=bits, error_feedback=False)
    draws = 4000
    batch = x.expand(draws, -1).contiguous()
    payload, _ = codec.encode(batch, server_round=rnd, client_ids=torch.arange(draws))
    q = codec.decode(payload).double()
    v, s, d = x[0].double(), codec.levels, x.shape[1]
    norm = float(v.norm())
    # Every draw lies on the grid of norm/s next to v_i (stochastic rounding between neighbours).
    assert float((q - v).abs().max()) <= norm / s * (1 + 1e-5) + 1e-6
    # Unbiased: per-coordinate variance <= (norm/s)^2 / 4, so the mean of N draws is within
    # 6 standard errors with overwhelming probability.
    tol = 6 * norm / (2 * s * math.sqrt(draws)) + 1e-4 * norm
    assert float((q.mean(0) - v).abs().max()) <= tol
    mse = float(((q - v) ** 2).sum(1).mean())
    assert mse <= 1.1 * min(d / s**2, math.sqrt(d) / s) * norm**2 + 1e-9


@PROPS
@given(x=vectors(max_dim=32), bits=st.sampled_from([2, 3, 4]), rnd=st.integers(0, 10**6),
       headroom=st.floats(1.0, 4.0))
def test_qsgd_shared_scale_is_unbiased_inside_the_scale(x, bits, rnd, headroom):
    scale = headroom * float(x.abs().max())
    codec = UpdateCodec(method="qsgd", bits=bits, scale=scale, error_feedback=False)
    draws = 4000
    payload, _ = codec.encode(x.expand(draws, -1).contiguous(), server_round=rnd,
                              client_ids=torch.arange(draws))
    q, v, s = codec.decode(payload).double(), x[0].double(), codec.levels
    tol = 6 * scale / (2 * s * math.sqrt(draws)) + 1e-4 * scale
    assert float((q.mean(0) - v).abs().max()) <= tol
    # Each coordinate rounds between neighbours scale/s apart: variance <= (scale/s)^2 / 4.
    mse = float(((q - v) ** 2).sum(1).mean())
    assert mse <= 1.1 * x.shape[1] * (scale / s) ** 2 / 4 + 1e-9


def test_rounding_streams_look_uniform_and_independent():
    from confide.compression import _uniform

    u = _uniform(123456789, torch.arange(64) * 7919, 4096, torch.device("cpu")).double()
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 0.004
    centred = u - u.mean(1, keepdim=True)
    corr = (centred @ centred.T) / (centred.norm(dim=1)[:, None] * centred.norm(dim=1)[None])
    off = corr[~torch.eye(64, dtype=torch.bool)]
    assert float(off.abs().max()) < 0.08  # 4096 samples: |r| of independent rows ~ 0.016
    lag = centred[:, 1:] * centred[:, :-1]
    assert abs(float(lag.mean())) / float(centred.pow(2).mean()) < 0.01  # no serial pattern


@PROPS
@given(x=vectors(rows=3), bits=st.sampled_from([2, 5, 8, 16]), scale=st.floats(0.5, 2e3))
def test_qsgd_shared_scale_grid_and_clipping(x, bits, scale):
    codec = UpdateCodec(method="qsgd", bits=bits, scale=scale, error_feedback=False)
    payload, _ = codec.encode(x, server_round=1, client_ids=[4, 5, 6])
    assert set(payload.arrays) == {"codes"}  # the scale is shared, not sent
    q = codec.decode(payload)
    clipped = x.clamp(-scale, scale)
    assert float((q - clipped).abs().max()) <= scale / codec.levels * (1 + 1e-5) + 1e-5


def test_qsgd_rounding_is_per_client_not_per_batch():
    codec = UpdateCodec(method="qsgd", bits=3)
    x = torch.randn(6, 500, generator=torch.Generator().manual_seed(0))
    whole, _ = codec.encode(x, server_round=2, client_ids=[10, 11, 12, 13, 14, 15])
    alone, _ = codec.encode(x[3], server_round=2, client_ids=13)
    assert torch.equal(codec.decode(whole)[3], codec.decode(alone))
    again, _ = codec.encode(x, server_round=2, client_ids=[10, 11, 12, 13, 14, 15])
    assert torch.equal(again.arrays["codes"], whole.arrays["codes"])  # same seed, same payload
    other, _ = codec.encode(x, server_round=3, client_ids=[10, 11, 12, 13, 14, 15])
    assert not torch.equal(other.arrays["codes"], whole.arrays["codes"])
    # Clients given the same vector round independently (no shared stream).
    same = x[:1].expand(2, -1)
    pair, _ = UpdateCodec(method="qsgd", bits=3).encode(same, server_round=2, client_ids=[1, 2])
    dense = codec.decode(pair)
    assert not torch.equal(dense[0], dense[1])


def test_qsgd_needs_client_ids():
    with pytest.raises(ValueError, match="client_ids"):
        UpdateCodec(method="qsgd").encode(torch.ones(3), server_round=0)


# --------------------------------------------------------------------------- top-k, sign


@PROPS
@given(x=vectors(rows=2), ratio=st.floats(0.01, 1.0))
def test_topk_exact_on_kept_and_error_is_the_dropped_norm(x, ratio):
    codec = UpdateCodec(method="topk", ratio=ratio, error_feedback=False)
    payload, _ = codec.encode(x, server_round=0)
    dense = codec.decode(payload)
    k = codec.kept(x.shape[1])
    for row in range(2):
        kept = payload.arrays["indices"][row].long()
        assert kept.numel() == k
        assert torch.equal(dense[row, kept], x[row, kept])
        dropped = torch.ones(x.shape[1], dtype=torch.bool)
        dropped[kept] = False
        assert torch.all(dense[row, dropped] == 0)
        err = float((x[row] - dense[row]).norm())
        assert err == pytest.approx(float(x[row, dropped].norm()), rel=1e-6, abs=1e-6)
        if dropped.any():
            assert float(x[row, dropped].abs().max()) <= float(x[row, kept].abs().min())


@PROPS
@given(x=vectors(max_dim=200, rows=2))
def test_sign_is_scaled_sign_with_karimireddy_error(x):
    codec = UpdateCodec(method="sign", error_feedback=False)
    payload, _ = codec.encode(x, server_round=0)
    dense = codec.decode(payload).double()
    xd = x.double()
    d = x.shape[1]
    scale = xd.abs().sum(1, keepdim=True) / d
    assert torch.allclose(dense, torch.where(xd >= 0, scale, -scale), rtol=1e-6)
    # ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d (Karimireddy et al. 2019, Lemma 8's delta).
    err = ((dense - xd) ** 2).sum(1)
    want = (xd**2).sum(1) - xd.abs().sum(1) ** 2 / d
    assert torch.allclose(err, want, rtol=1e-4, atol=1e-3 * float((xd**2).sum(1).max()) * 1e-3)


# --------------------------------------------------------------------------- error feedback


@PROPS
@given(method=st.sampled_from(["qsgd", "topk", "randk", "sign"]), rounds=st.integers(1, 6),
       dim=st.integers(2, 80), seed=st.integers(0, 2**31))
def test_error_feedback_residual_telescopes(method, rounds, dim, seed):
    # Karimireddy et al. 2019, Alg. 2: e_{t+1} = (e_t + u_t) - C(e_t + u_t), so
    # sum_t C(e_t + u_t) + e_T = sum_t u_t.
    codec = UpdateCodec(method=method, bits=3, ratio=0.2, error_feedback=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    residual = torch.zeros(3, dim)
    sent = torch.zeros(3, dim, dtype=torch.float64)
    computed = torch.zeros(3, dim, dtype=torch.float64)
    for t in range(rounds):
        u = torch.randn(3, dim, generator=gen)
        payload, residual = codec.encode(u, server_round=t, client_ids=[7, 8, 9],
                                         residuals=residual)
        sent += codec.decode(payload).double()
        computed += u.double()
    assert torch.allclose(sent + residual.double(), computed, atol=1e-4)


def test_error_feedback_on_one_vector_and_without_residual():
    codec = UpdateCodec(method="topk", ratio=0.25)
    u = torch.tensor([4.0, -1.0, 0.5, 3.0])
    payload, residual = codec.encode(u, server_round=0)
    assert codec.decode(payload).shape == (4,) and residual.shape == (4,)
    assert torch.equal(codec.decode(payload) + residual, u)
    payload2, residual2 = codec.encode(torch.zeros(4), server_round=1, residuals=residual)
    assert torch.equal(codec.decode(payload2), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert UpdateCodec(method="topk", error_feedback=False).encode(u, server_round=0)[1] is None


# --------------------------------------------------------------------------- random-k, SecAgg


@PROPS
@given(dim=st.integers(1, 300), ratio=st.floats(0.01, 1.0), rnd=st.integers(0, 10**6),
       clients=st.integers(1, 6))
def test_randk_shared_indices_and_sum_of_payloads(dim, ratio, rnd, clients):
    codec = UpdateCodec(method="randk", ratio=ratio, seed=5)
    x = torch.randn(clients, dim, generator=torch.Generator().manual_seed(rnd))
    # Each client encodes on its own; all keep the same coordinates.
    payloads = [codec.encode(x[i], server_round=rnd)[0] for i in range(clients)]
    shared = codec.shared_indices(dim, server_round=rnd)
    assert shared.numel() == codec.kept(dim) == len(set(shared.tolist()))
    for i, p in enumerate(payloads):
        assert torch.equal(p.arrays["values"][0], x[i, shared])
    decoded = sum(codec.decode(p) for p in payloads)
    values_sum = sum(p.arrays["values"] for p in payloads)  # what secure aggregation returns
    assert torch.allclose(codec.densify_sum(values_sum, dim=dim, server_round=rnd), decoded,
                          atol=1e-5)
    batch, _ = codec.encode(x, server_round=rnd)
    assert torch.allclose(codec.decode(batch.summed()), decoded, atol=1e-5)
    assert torch.allclose(codec.decode_sum(batch), decoded, atol=1e-5)


def test_randk_without_error_feedback_is_rescaled_to_be_unbiased():
    codec = UpdateCodec(method="randk", ratio=0.1, error_feedback=False)
    x = torch.ones(1, 100)
    dense = codec.decode(codec.encode(x, server_round=4)[0])
    assert torch.equal(dense[dense != 0], torch.full((10,), 10.0))
    rounds = torch.stack([codec.decode(codec.encode(x, server_round=r)[0])[0]
                          for r in range(400)])
    assert float((rounds.mean(0) - 1).abs().max()) < 0.6  # E over the shared draw = x


@PROPS
@given(clients=st.integers(1, 20), bits=st.integers(2, 8), dim=st.integers(1, 50),
       rnd=st.integers(0, 1000))
def test_qsgd_codes_summed_in_the_field_decode_to_the_sum(clients, bits, dim, rnd):
    codec = UpdateCodec(method="qsgd", bits=bits, scale=1.5, error_feedback=False)
    field_bits = field_bits_needed(levels=codec.levels, num_clients=clients)  # smallest
    x = torch.randn(clients, dim, generator=torch.Generator().manual_seed(rnd))
    payload, _ = codec.encode(x, server_round=rnd, client_ids=torch.arange(clients))
    words = codec.to_field(payload, field_bits=field_bits)
    assert int(words.min()) >= 0 and int(words.max()) < 2**field_bits
    modular_sum = words.sum(0) % (2**field_bits)
    total = codec.decode_field_sum(modular_sum, field_bits=field_bits, num_clients=clients)
    assert torch.allclose(total, codec.decode_sum(payload), atol=1e-5)
    assert clients * codec.levels <= 2 ** (field_bits - 1) - 1
    assert field_levels(field_bits=field_bits, num_clients=clients) >= codec.levels


def test_field_too_small_is_refused_and_would_wrap():
    codec = UpdateCodec(method="qsgd", bits=3, scale=1.0)  # s = 3
    x = torch.full((3, 4), 5.0)  # every code at +s
    payload, _ = codec.encode(x, server_round=0, client_ids=[0, 1, 2])
    words = codec.to_field(payload, field_bits=4)  # 3 * 3 = 9 > 2^3 - 1
    with pytest.raises(ConfigError) as info:
        codec.decode_field_sum(words.sum(0) % 16, field_bits=4, num_clients=3)
    assert "too small for 3 clients" in str(info.value) and "\n" not in str(info.value)
    assert int(words.sum(0)[0]) % 16 == 9  # lifted to -7: the sum wrapped; the check is needed
    check_field(levels=3, num_clients=3, field_bits=5)


def test_only_shared_scale_qsgd_maps_into_the_field():
    codec = UpdateCodec(method="qsgd")
    payload, _ = codec.encode(torch.ones(2, 3), server_round=0, client_ids=[0, 1])
    with pytest.raises(ConfigError, match="shared scale"):
        codec.to_field(payload, field_bits=16)


@pytest.mark.parametrize("method", ["topk", "sign"])
def test_methods_that_cannot_sum_are_refused_with_secagg(method):
    with pytest.raises(ConfigError) as info:
        check_secure_aggregation(method)
    assert "cannot run with secure aggregation" in str(info.value)
    assert "\n" not in str(info.value)
    for ok in ("none", "qsgd", "randk"):
        check_secure_aggregation(ok)


def test_codec_from_config_shares_the_scale_under_secagg():
    cfg = load_config(None, ["compression.method='qsgd'", "secure_aggregation.enabled=true",
                             "run.seed=9"])
    codec = UpdateCodec.from_config(cfg)
    assert codec.scale == cfg.secure_aggregation.clipping_range and codec.seed == 9
    plain = UpdateCodec.from_config(load_config(None, ["compression.method='qsgd'"]))
    assert plain.scale is None and plain.bits == 8


# --------------------------------------------------------------------------- bytes


def test_bytes_on_the_wire():
    dim = 10_000
    x = torch.randn(4, dim)
    dense = 4 * dim * 4
    q8, _ = UpdateCodec(method="qsgd", bits=8).encode(x, server_round=0, client_ids=range(4))
    assert q8.nbytes == 4 * (dim + 4) and dense / q8.nbytes > 3.99
    rk, _ = UpdateCodec(method="randk", ratio=0.1).encode(x, server_round=0)
    assert rk.nbytes == dense // 10  # values only: the shared indices are not sent
    tk, _ = UpdateCodec(method="topk", ratio=0.1).encode(x, server_round=0)
    assert tk.nbytes == dense // 10 * 2  # values and int32 indices
    sg, _ = UpdateCodec(method="sign").encode(x, server_round=0)
    assert sg.nbytes == 4 * (dim // 8 + 4)
    for codec, p in [(UpdateCodec(method="qsgd", bits=8), q8),
                     (UpdateCodec(method="randk", ratio=0.1), rk)]:
        assert codec.wire_bytes(dim, 4) == p.nbytes == count_bytes(p)
    q3, _ = UpdateCodec(method="qsgd", bits=3, scale=1.0).encode(x, server_round=0,
                                                                 client_ids=range(4))
    assert q3.nbytes == 4 * math.ceil(dim * 3 / 8)


def test_count_bytes_of_a_message():
    msg = {"update": torch.zeros(10), "codes": np.zeros(3, dtype=np.uint8), "blob": b"abcd",
           "round": 3, "meta": ["é", 1.5], "none": None}
    keys = sum(len(k) for k in msg)
    assert count_bytes(msg) == keys + 40 + 3 + 4 + 8 + 2 + 8
    with pytest.raises(TypeError):
        count_bytes(object())


# --------------------------------------------------------------------------- peer payloads


def _valid(method):
    codec = UpdateCodec(method=method, bits=4, ratio=0.5)
    payload, _ = codec.encode(torch.randn(2, 10), server_round=1, client_ids=[0, 1])
    return codec, payload


def _with(payload, **arrays):
    return CompressedUpdate(method=payload.method, dim=payload.dim, bits=payload.bits,
                            server_round=payload.server_round, scale=payload.scale,
                            arrays={**payload.arrays, **arrays})


@pytest.mark.parametrize(
    ("method", "change", "fragment"),
    [
        ("topk", {"indices": torch.tensor([[0, 1, 2, 3, 10]] * 2, dtype=torch.int32)},
         "outside"),
        ("topk", {"indices": torch.tensor([[0, 0, 2, 3, 4]] * 2, dtype=torch.int32)}, "repeat"),
        ("topk", {"indices": torch.zeros(2, 5, dtype=torch.int64)}, "must be a"),
        ("randk", {"values": torch.full((2, 5), float("nan"))}, "non-finite"),
        ("randk", {"values": torch.zeros(2, 6)}, "columns"),
        ("qsgd", {"codes": torch.full((2, 5), 255, dtype=torch.uint8)}, "exceeds"),
        ("qsgd", {"norms": torch.tensor([1.0, -1.0])}, "negative"),
        ("qsgd", {"norms": torch.ones(3)}, "disagree"),
        ("sign", {"signs": torch.zeros(2, 3, dtype=torch.uint8)}, "columns"),
        ("sign", {"bogus": torch.zeros(1)}, "exactly"),
    ],
)
def test_malformed_payloads_are_protocol_errors(method, change, fragment):
    codec, payload = _valid(method)
    with pytest.raises(ProtocolError, match=fragment):
        codec.decode(_with(payload, **change))


def test_payload_of_another_method_is_refused():
    codec, _ = _valid("randk")
    _, other = _valid("topk")
    with pytest.raises(ProtocolError, match="payload for a"):
        codec.decode(other)


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["none", "qsgd", "topk", "randk", "sign"]),
       dim=st.integers(-2, 40), data=st.data())
def test_decode_fuzz_never_crashes_otherwise(method, dim, data):
    codec = UpdateCodec(method=method, bits=4, ratio=0.5)
    dtypes = [torch.float32, torch.uint8, torch.int32, torch.int64, torch.float64]
    names = data.draw(st.sets(st.sampled_from(["values", "indices", "codes", "norms", "signs",
                                               "scales"]), min_size=1, max_size=3))
    arrays = {}
    for name in names:
        shape = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=2))
        dtype = data.draw(st.sampled_from(dtypes))
        raw = data.draw(st.lists(st.integers(-300, 300), min_size=math.prod(shape),
                                 max_size=math.prod(shape)))
        arrays[name] = torch.tensor(raw, dtype=torch.int64).reshape(shape).to(dtype)
    payload = CompressedUpdate(method=method, dim=dim, bits=4, arrays=arrays)
    try:
        dense = codec.decode(payload)
    except ProtocolError:
        return
    assert dense.shape[-1] == dim and bool(torch.isfinite(dense).all())


def test_codec_settings_are_checked():
    for kwargs, fragment in [({"method": "zip"}, "not allowed"),
                             ({"method": "topk", "ratio": 0.0}, "(0, 1]"),
                             ({"method": "qsgd", "bits": 17}, "2 to 16"),
                             ({"method": "qsgd", "scale": -1.0}, "positive")]:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            UpdateCodec(**kwargs)


@PROPS
@given(method=st.sampled_from(["none", "qsgd", "topk", "randk", "sign"]),
       ef=st.booleans(), shared=st.booleans(), x=vectors(max_dim=50, rows=3),
       clip=st.floats(1e-3, 100.0), seed=st.integers(0, 1000))
def test_clipped_encodings_stay_within_the_sensitivity(method, ef, shared, x, clip, seed):
    codec = UpdateCodec(method=method, bits=3, ratio=0.3, error_feedback=ef,
                        scale=0.5 if shared and method == "qsgd" else None)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 50
    payload, new_residual = codec.encode(x, server_round=seed, client_ids=[0, 1, 2],
                                         residuals=residual, clip_norm=clip)
    norms = torch.linalg.vector_norm(codec.decode(payload).double(), dim=1)
    bound = codec.sensitivity(clip_norm=clip, dim=x.shape[1])
    assert float(norms.max()) <= bound * (1 + 1e-5) + 1e-6
    if ef and method != "none":  # the residual is what the clipped vector did not send
        clipped = x + residual
        clipped = clipped * torch.clamp(clip / torch.linalg.vector_norm(clipped, dim=1,
                                                                         keepdim=True), max=1)
        assert torch.allclose(codec.decode(payload) + new_residual, clipped, atol=1e-4)


def test_residual_survives_a_checkpoint(tmp_path):
    # The residual is client state: saved and reloaded (weights_only, as checkpoints are),
    # the run continues exactly as if it had not stopped.
    codec = UpdateCodec(method="qsgd", bits=3, error_feedback=True, seed=2)
    updates = torch.randn(5, 4, 30, generator=torch.Generator().manual_seed(1))

    def run(rounds, residual):
        sent = []
        for t in rounds:
            payload, residual = codec.encode(updates[t], server_round=t, client_ids=range(4),
                                             residuals=residual)
            sent.append(codec.decode(payload))
        return sent, residual

    straight, _ = run(range(5), None)
    first, residual = run(range(3), None)
    torch.save({"compression_residual": residual}, tmp_path / "client_state.pt")
    loaded = torch.load(tmp_path / "client_state.pt", weights_only=True)["compression_residual"]
    rest, _ = run(range(3, 5), loaded)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest, strict=True))
