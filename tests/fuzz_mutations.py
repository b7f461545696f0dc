"""Mutation operators for fuzzing decoders: bytes, .npy files, texts, JSON and record values.

Valid messages are mutated as a network, a bug or an attacker would: bit flips, byte edits,
truncation, extension, insertion, deletion, duplication, edits of known length fields,
rewritten ``.npy`` headers (other dtypes, huge or negative shapes, broken syntax), edited
texts (non-ASCII, separators, truncation) and JSON fields of other types or deep nesting.
All randomness comes from the :class:`random.Random` passed in.
"""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LengthField", "mutate_bytes", "npy", "npy_case", "npy_header_edit",
           "config_value", "text_mutation", "json_case", "INTS"]

_BOUNDARY = (0, 1, 0x7F, 0x80, 0xFF)
INTS = (0, 1, 2, 3, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**53, 2**63 - 1, 2**64 - 1, 2000000000000)

# --------------------------------------------------------------------------- byte mutations


@dataclass(frozen=True)
class LengthField:
    """Where a length or count field sits in a format (for targeted edits)."""

    offset: int
    width: int
    order: str  # "big" | "little"


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n) if n else b""


def _one_mutation(data: bytearray, rng: random.Random, fields: tuple[LengthField, ...]) -> None:
    n = len(data)
    op = rng.randrange(10)
    if op == 0 and n:  # flip one bit
        i = rng.randrange(n)
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # set a byte to a boundary or random value
        data[rng.randrange(n)] = rng.choice(_BOUNDARY) if rng.random() < 0.5 else rng.randrange(256)
    elif op == 2 and n:  # truncate
        del data[rng.randrange(n):]
    elif op == 3:  # extend
        data.extend(_rand_bytes(rng, rng.choice((1, 2, 8, 64, rng.randrange(1, 512)))))
    elif op == 4:  # insert
        i = rng.randrange(n + 1)
        data[i:i] = _rand_bytes(rng, rng.randrange(1, 17))
    elif op == 5 and n:  # delete a range
        i = rng.randrange(n)
        del data[i:i + rng.randrange(1, 17)]
    elif op == 6 and n:  # duplicate a range
        i = rng.randrange(n)
        j = min(n, i + rng.randrange(1, 65))
        data[j:j] = data[i:j]
    elif op in (7, 8) and (fields or n >= 4):  # edit a length/count field
        if fields and op == 7:
            f = rng.choice(fields)
        else:
            f = LengthField(rng.randrange(max(1, n - 3)), rng.choice((1, 2, 4, 8)),
                            rng.choice(("big", "little")))
        value = rng.choice(INTS + (n, n - 1, n + 1, rng.getrandbits(8 * f.width)))
        value %= 1 << (8 * f.width)
        end = f.offset + f.width
        if end <= len(data):
            data[f.offset:end] = value.to_bytes(f.width, f.order)
    elif n:  # swap two bytes
        i, j = rng.randrange(n), rng.randrange(n)
        data[i], data[j] = data[j], data[i]


def mutate_bytes(seed: bytes, rng: random.Random,
                 fields: tuple[LengthField, ...] = ()) -> bytes:
    """``seed`` with 1-4 random mutations (at most ~2 KiB longer)."""
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        _one_mutation(data, rng, fields)
    return bytes(data)


# --------------------------------------------------------------------------- .npy edits


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_DESCRS = ("<f4", "<f8", "<f2", ">f4", "|u1", "<i8", "|b1", "|O", "<U8", "|V8", "<c16", "<M8[s]",
           "f4", "<f16", "<f4 ", "")
_SHAPES = ("()", "(0,)", "(1,)", "(37,)", "(11,)", "(2000000000000,)", "(2, 3)",
           "(9223372036854775807,)", "(-1,)", "(1.5,)", "(3, -3)", "('a',)", "(" + "1," * 40 + ")",
           "(" + "9" * 400 + ",)", "", "[37]")


def npy_header_edit(rng: random.Random, payload_entries: int, itemsize: int) -> bytes:
    """A .npy file whose header is rewritten: other dtypes, shapes, orders, broken syntax."""
    descr = rng.choice(_DESCRS)
    shape = rng.choice(_SHAPES) if rng.random() < 0.7 else f"({payload_entries},)"
    fortran = rng.choice(("False", "True", "0", "None"))
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    edit = rng.randrange(6)
    if edit == 0:
        text = text.replace("}", "")  # the TokenError of issue 12
    elif edit == 1:
        text = text.replace("'shape'", "'shapes'")
    elif edit == 2:
        text = f"{{'fortran_order': False, 'descr': '<f4', 'shape': ({payload_entries},), }}"
    elif edit == 3:
        text = text + " 'extra': 1}"
    elif edit == 4:
        text = text.replace(" ", "\t")
    header = text.encode("utf-8", "replace")
    pad = (-(10 + len(header) + 1)) % 64
    header = header + b" " * pad + b"\n"
    version = rng.choice(((1, 0), (1, 0), (2, 0), (3, 0), (0, 9), (4, 0)))
    hlen = len(header) if rng.random() < 0.9 else rng.choice(INTS) % 65536
    if version[0] == 1:
        prefix = b"\x93NUMPY" + bytes(version) + struct.pack("<H", hlen % 65536)
    else:
        prefix = b"\x93NUMPY" + bytes(version) + struct.pack("<I", hlen % 2**32)
    body = _rand_bytes(random.Random(rng.getrandbits(32)), payload_entries * itemsize)
    if rng.random() < 0.3:
        body = body[:rng.randrange(len(body) + 1)]
    return prefix + header + body


_NPY_FIELDS = (LengthField(8, 2, "little"), LengthField(8, 4, "little"),
               LengthField(6, 2, "little"))


def npy_case(rng: random.Random, seeds: list[bytes], entries: int, itemsize: int) -> bytes:
    """Mutated or header-edited .npy bytes."""
    r = rng.random()
    if r < 0.35:
        return npy_header_edit(rng, entries, itemsize)
    return mutate_bytes(rng.choice(seeds), rng, _NPY_FIELDS)



def config_value(rng: random.Random) -> Any:
    return rng.choice([
        rng.choice(INTS), -rng.choice(INTS), rng.randrange(-5, 100), float("nan"),
        float("inf"), -float("inf"), rng.random() * 10, 1e308, -0.0, "", "x" * rng.randrange(40),
        "sgd", "adam", "\u00e9\ud7ff", b"\x00\xff", True, False, [1, 2, 3], [0.5], ["a"],
        [], [True], 2**70])


def text_mutation(text: str, rng: random.Random) -> str:
    """Edits a JSON/PEM/token text as a person or an attacker would."""
    op = rng.randrange(8)
    if op == 0 and text:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(("\u00e9", "\u2603", "\x00", "\ud800", "\U0001f600", "=",
                                      ".", "\n", '"', "\\")) + text[i + 1:]
    if op == 1:
        return text[:rng.randrange(len(text) + 1)]
    if op == 2:
        return text + rng.choice(("=", "==", ".", "x" * 600, "\n\n", " "))
    if op == 3 and "." in text:
        parts = text.split(".")
        i = rng.randrange(len(parts))
        parts[i] = rng.choice(("", "A" * rng.randrange(100), parts[i][::-1], parts[i] + "A",
                               parts[i][1:], parts[i].upper(), "+/+/"))
        return ".".join(parts)
    if op == 4 and text:
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1:]
    return mutate_bytes(text.encode("utf-8", "surrogatepass"), rng).decode("utf-8", "replace")


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    makers: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: rng.choice(INTS), lambda: 1.5e308,
        lambda: "x" * rng.randrange(30), lambda: "\u00e9\u2603", lambda: [1] * rng.randrange(5),
        lambda: [_json_value(rng, depth + 1)], lambda: {"k": _json_value(rng, depth + 1)}]
    return makers[rng.randrange(len(makers) if depth < 3 else 7)]()


def json_case(obj: dict[str, Any], rng: random.Random) -> bytes:
    obj = dict(obj)
    op = rng.randrange(7)
    if op == 0 and obj:  # a field of another type
        obj[rng.choice(list(obj))] = _json_value(rng)
    elif op == 1 and obj:  # a field removed
        del obj[rng.choice(list(obj))]
    elif op == 2 and obj:  # a string field edited (non-ASCII, truncated, ...)
        keys = [k for k, v in obj.items() if isinstance(v, str)]
        if keys:
            k = rng.choice(keys)
            obj[k] = text_mutation(obj[k], rng)
    elif op == 3:  # deep nesting / not an object
        depth = rng.choice((10, 1000, 100000))
        return rng.choice((b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                           b"1" * rng.choice((10, 5000)), b'"text"', b"null"))
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    data = text.encode("utf-8", "surrogatepass")
    if op >= 5:
        data = mutate_bytes(data, rng)
    return data
