"""The cryptographic primitives: agreement, key derivation, AEAD, the mask PRG, Shamir."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.exceptions import ProtocolError
from confide.privacy.secagg import primitives as crypto


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    rng = random.Random(1234)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_a_prime_just_above_256_bits():
    p = crypto.FIELD_PRIME
    assert p > 2**256
    assert _is_probable_prime(p)
    assert not any(_is_probable_prime(q) for q in range(2**256 + 1, p, 2))
    assert p < 2 ** (8 * crypto.SHARE_BYTES)


def test_x25519_agreement_is_symmetric_and_keys_are_fresh():
    a_sk, a_pk = crypto.generate_keypair()
    b_sk, b_pk = crypto.generate_keypair()
    assert crypto.agree(a_sk, b_pk) == crypto.agree(b_sk, a_pk)
    assert crypto.public_key_of(a_sk) == a_pk
    assert len({crypto.generate_keypair()[0] for _ in range(20)}) == 20


def test_small_order_and_malformed_public_keys_are_refused():
    sk, _ = crypto.generate_keypair()
    with pytest.raises(ProtocolError, match="small order"):
        crypto.agree(sk, bytes(32))
    with pytest.raises(ProtocolError, match="32 bytes"):
        crypto.agree(sk, bytes(31))


def test_derived_keys_are_bound_to_context_purpose_and_pair():
    shared = bytes(range(32))
    base = crypto.derive_key(shared, context=b"round-1", purpose=b"p", first=1, second=2)
    variants = [
        crypto.derive_key(shared, context=b"round-2", purpose=b"p", first=1, second=2),
        crypto.derive_key(shared, context=b"round-1", purpose=b"q", first=1, second=2),
        crypto.derive_key(shared, context=b"round-1", purpose=b"p", first=2, second=1),
        crypto.derive_key(shared, context=b"round-1", purpose=b"p", first=1, second=3),
    ]
    assert len({base, *variants}) == 5
    assert base == crypto.derive_key(shared, context=b"round-1", purpose=b"p", first=1, second=2)


def test_aead_rejects_tampering_wrong_context_and_truncation():
    key = bytes(32)
    sealed = crypto.encrypt(key, b"secret share", b"ad")
    assert crypto.decrypt(key, sealed, b"ad") == b"secret share"
    flipped = bytearray(sealed)
    flipped[20] ^= 1
    with pytest.raises(ProtocolError, match="authentication"):
        crypto.decrypt(key, bytes(flipped), b"ad")
    with pytest.raises(ProtocolError, match="authentication"):
        crypto.decrypt(key, sealed, b"another round")
    with pytest.raises(ProtocolError, match="authentication"):
        crypto.decrypt(bytes([1] * 32), sealed, b"ad")
    with pytest.raises(ProtocolError, match="truncated"):
        crypto.decrypt(key, sealed[:20], b"ad")


@pytest.mark.parametrize("bits", [8, 13, 32, 33, 62])
def test_mask_prg_is_deterministic_per_seed_and_in_range(bits):
    seed = crypto.new_seed()
    a = crypto.expand_mask(seed, 1000, bits)
    assert np.array_equal(a, crypto.expand_mask(seed, 1000, bits))
    assert not np.array_equal(a, crypto.expand_mask(crypto.new_seed(), 1000, bits))
    assert int(a.max()) < 2**bits
    acc = np.zeros(1000, dtype=crypto.mask_dtype(bits))
    crypto.add_mask(acc, seed, bits, sign=+1)
    crypto.add_mask(acc, seed, bits, sign=-1)
    assert not acc.any()


def test_mask_prg_output_is_uniform():
    """Chi-square test of 2^18 entries of Z_{2^8} (255 degrees of freedom)."""
    values = crypto.expand_mask(crypto.new_seed(), 2**18, 8)
    counts = np.bincount(values, minlength=256)
    expected = values.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 dof: mean 255, sd 22.6; 400 is a 1e-8 tail, 150 a 1e-7 one
    assert 150 < chi2 < 400


@settings(max_examples=40, deadline=None)
@given(threshold=st.integers(1, 8), extra=st.integers(0, 6), data=st.data())
def test_any_threshold_shares_reconstruct_the_secret(threshold, extra, data):
    secret = crypto.new_seed()
    holders = data.draw(st.lists(st.integers(0, 2**64 - 2), min_size=threshold + extra,
                                 max_size=threshold + extra, unique=True))
    shares = crypto.split_secret(secret, threshold=threshold, holders=holders)
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=threshold,
                                max_size=threshold, unique=True))
    got, wrong = crypto.reconstruct_secret({h: shares[h] for h in subset}, threshold=threshold,
                                           verify=lambda s: s == secret)
    assert got == secret and wrong == []


@settings(max_examples=25, deadline=None)
@given(threshold=st.integers(2, 6), extra=st.integers(1, 4), data=st.data())
def test_a_wrong_share_is_identified_and_skipped(threshold, extra, data):
    secret = crypto.new_seed()
    holders = list(range(threshold + extra))
    shares = crypto.split_secret(secret, threshold=threshold, holders=holders)
    liar = data.draw(st.sampled_from(holders))
    shares[liar] = (shares[liar] + 1) % crypto.FIELD_PRIME
    got, wrong = crypto.reconstruct_secret(shares, threshold=threshold,
                                           verify=lambda s: s == secret)
    assert got == secret and wrong == [liar]


def test_fewer_than_threshold_shares_cannot_reconstruct():
    secret = crypto.new_seed()
    shares = crypto.split_secret(secret, threshold=3, holders=[1, 2, 3])
    with pytest.raises(ProtocolError, match="cannot reconstruct"):
        crypto.reconstruct_secret({1: shares[1], 2: shares[2]}, threshold=3,
                                  verify=lambda s: True)
    # with t - 1 shares every secret is equally consistent: interpolating them at zero
    # gives an unrelated value
    line = crypto.interpolate_at([(2, shares[1]), (3, shares[2])], 0)
    assert line != int.from_bytes(secret, "big")


def test_inconsistent_shares_fail_clearly():
    secret = crypto.new_seed()
    shares = crypto.split_secret(secret, threshold=2, holders=[1, 2])
    shares[1] += 1
    with pytest.raises(ProtocolError, match="inconsistent"):
        crypto.reconstruct_secret(shares, threshold=2, verify=lambda s: s == secret)
