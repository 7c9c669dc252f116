"""Frames of the guest agent protocol: encoding, and refusal of anything that is not a frame."""

from __future__ import annotations

import pytest

from metald.agent.protocol import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    Frame,
    MsgType,
    ProtocolError,
    Tag,
    encode,
    parse_fields,
    parse_header,
    sets_nics,
)


def decode(data: bytes) -> Frame:
    msg_type, request_id, length = parse_header(data[: HEADER.size])
    assert len(data) == HEADER.size + length
    return Frame(msg_type, request_id, parse_fields(data[HEADER.size :]))


def test_round_trip_is_binary_safe() -> None:
    blob = bytes(range(256)) * 3 + b"\n\0\xf5"
    data = encode(
        MsgType.EXEC, 0xFFFFFFFF, [(Tag.ARG, "echo"), (Tag.ARG, "é"), (Tag.STDIN, blob), (Tag.TIMEOUT_MS, -5)]
    )
    assert data[0] == MAGIC and data[1] == 1
    frame = decode(data)
    assert (frame.type, frame.request_id) == (MsgType.EXEC, 0xFFFFFFFF)
    assert [v for t, v in frame.fields if t == Tag.ARG] == [b"echo", "é".encode()]
    assert frame.raw(Tag.STDIN) == blob
    assert frame.integer(Tag.TIMEOUT_MS) == -5
    assert frame.integer(Tag.CODE, 7) == 7 and frame.raw(Tag.CODE) is None


def test_empty_payload() -> None:
    frame = decode(encode(MsgType.PING, 1))
    assert frame == Frame(MsgType.PING, 1, ())


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (b"ping hello\n\0", "magic"),
        (bytes([MAGIC, 2, 3, 0, 0, 0, 0, 1, 0, 0, 0, 0]), "version"),
        (bytes([MAGIC, 1, 3, 0, 0, 0, 0, 1]) + (MAX_PAYLOAD + 1).to_bytes(4, "big"), "exceeds"),
        (bytes([MAGIC, 1, 3, 0, 0, 0, 0, 1]) + b"\xff\xff\xff\xff", "exceeds"),
    ],
)
def test_bad_headers_are_refused_before_any_payload_is_read(header: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_header(header)


def test_a_smaller_limit_applies() -> None:
    with pytest.raises(ProtocolError):
        parse_header(encode(MsgType.FILE, 1, [(Tag.DATA, b"x" * 100)])[: HEADER.size], max_payload=50)


@pytest.mark.parametrize(
    "payload",
    [b"\x08", b"\x08\x00\x00\x00", b"\x08\x00\x00\x00\x05abc", b"\x08\x00\x00\x00\x00\x09\xff\xff\xff\xff"],
)
def test_fields_must_fill_the_payload_exactly(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_fields(payload)


def test_integer_fields_have_eight_bytes() -> None:
    frame = Frame(MsgType.EXIT, 1, ((Tag.CODE, b"\x01"),))
    with pytest.raises(ProtocolError):
        frame.integer(Tag.CODE)


def test_oversized_payload_is_not_encoded() -> None:
    with pytest.raises(ValueError):
        encode(MsgType.WRITE, 1, [(Tag.DATA, b"\0" * (MAX_PAYLOAD + 1))])


def test_a_nic_field_is_tag_23_with_the_spec_as_text() -> None:
    spec = "02:fc:00:00:00:07,10.9.0.7/24,10.9.0.1,,"
    data = encode(MsgType.REFRESH, 9, [(Tag.HOSTNAME, "h"), (Tag.NIC, spec)])
    assert data[HEADER.size + 6 :] == bytes([23]) + len(spec).to_bytes(4, "big") + spec.encode()
    assert decode(data).text(Tag.NIC) == spec


@pytest.mark.parametrize(
    ("fields", "set_by_agent"),
    [
        ((), False),  # version 2: a bare OK, the NICs were ignored
        (((Tag.VERSION, b"2"),), False),
        (((Tag.VERSION, b"3"),), True),
        (((Tag.VERSION, b"12"),), True),
        (((Tag.VERSION, b"3a"),), False),
    ],
)
def test_only_an_ok_of_version_3_on_says_the_nics_were_set(
    fields: tuple[tuple[int, bytes], ...], set_by_agent: bool
) -> None:
    assert sets_nics(Frame(MsgType.OK, 1, fields)) is set_by_agent
