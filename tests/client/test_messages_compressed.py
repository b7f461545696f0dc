"""Compressed updates on the wire (deployment): the reply carries the codec's arrays, the
coordinator decodes them with its own round state, and counts the bytes it received."""

from __future__ import annotations

import pytest
import torch

from confide.client.compression import BYTES_UP_KEY, PAYLOAD_KEY, CompressionStage
from confide.client.messages import decode_result, encode_result
from confide.client.pipeline import StageContext
from confide.client.round import ClientResult
from confide.compression import UpdateCodec
from confide.exceptions import ProtocolError

DIM = 1000
CODECS = [UpdateCodec(method="qsgd", bits=8, seed=3),
          UpdateCodec(method="randk", ratio=0.1, seed=3),
          UpdateCodec(method="topk", ratio=0.05, seed=3), UpdateCodec(method="sign", seed=3)]


def _compressed_result(codec: UpdateCodec, server_round: int = 4) -> tuple[ClientResult, int]:
    stage = CompressionStage(codec, dim=DIM, keep_payload=True)
    ctx = StageContext(client_id=2, server_round=server_round, seed=1)
    dense = stage(torch.randn(DIM, generator=torch.Generator().manual_seed(0)), ctx)
    result = ClientResult(client_id=2, update=dense, num_examples=10, num_steps=3,
                          metrics={"train_loss": 0.5}, info=ctx.info)
    return result, int(ctx.info[BYTES_UP_KEY])


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.method)
def test_reply_carries_the_payload_and_decodes_to_what_the_client_kept(codec):
    result, payload_bytes = _compressed_result(codec)
    content = encode_result(result)
    arrays = content.array_records["confide.result_tensors"]
    assert "update" not in arrays  # the dense vector does not travel
    sent = sum(len(a.data) for a in arrays.values())
    assert payload_bytes <= sent <= payload_bytes + 128 * len(arrays)  # + .npy headers
    assert payload_bytes == codec.wire_bytes(DIM) and sent < 4 * DIM
    back = decode_result(content, client_id=2, num_params=DIM, codec=codec, server_round=4)
    assert torch.equal(back.update, result.update)  # exactly what the client's stage returned
    assert back.info[BYTES_UP_KEY] == payload_bytes  # counted by the coordinator
    assert PAYLOAD_KEY not in back.info


def test_randk_payload_decoded_for_another_round_lands_elsewhere():
    codec = CODECS[1]
    result, _ = _compressed_result(codec, server_round=4)
    back = decode_result(encode_result(result), client_id=2, num_params=DIM, codec=codec,
                         server_round=5)  # the coordinator's own round state decides
    assert not torch.equal(back.update, result.update)


def test_compressed_reply_without_a_codec_or_malformed_is_refused():
    codec = CODECS[0]
    result, _ = _compressed_result(codec)
    content = encode_result(result)
    with pytest.raises(ProtocolError, match="without compression"):
        decode_result(content, client_id=2, num_params=DIM)
    with pytest.raises(ProtocolError):  # a 4-bit codec reads an 8-bit payload's width wrong
        decode_result(content, client_id=2, num_params=DIM,
                      codec=UpdateCodec(method="qsgd", bits=4, seed=3))
    with pytest.raises(ProtocolError):
        decode_result(content, client_id=2, num_params=DIM + 8, codec=codec)
