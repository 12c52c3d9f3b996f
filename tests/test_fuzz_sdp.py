"""Fuzzing SDP offers through the WebRTC transport's offer handling (`RtcCall._answer`, app/transport/webrtc.py).

Starting from a real aiortc offer, hypothesis deletes, repeats, truncates and rewrites its lines and fields, and
also tries text that is no SDP at all. Applying any of them either answers the offer (with an `answer` event) or
raises `ProtocolError(bad_offer)`, quickly: never another exception (which the call would report as `internal`)
and never a hang. No network: ICE offers and gathers 127.0.0.1 only, and no call ever connects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from functools import cache

import aioice.ice
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.transport.protocol import MAX_SDP_BYTES, AnswerEvent, ErrorCode, ProtocolError
from app.transport.webrtc import restrict_ice_host_addresses
from tests.test_webrtc_unit import aiortc_offer, answer_event

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def loopback_ice() -> Iterator[None]:
    """ICE in this process offers 127.0.0.1 only, for this module's tests (module scope: hypothesis runs many
    examples per test, and a function-scoped fixture would not be reset between them)."""
    original = aioice.ice.get_host_addresses
    restrict_ice_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


@cache
def real_offer() -> str:
    """What a caller sends: a complete aiortc offer with one sendrecv audio section and its host candidate."""
    return asyncio.run(aiortc_offer())


def answer(sdp: str) -> str | ProtocolError:
    """The answer event `_answer` sends for this offer, or the ProtocolError it raises."""
    try:
        return asyncio.run(answer_event(sdp))
    except ProtocolError as error:
        return error


def check(sdp: str) -> str | ProtocolError:
    result = answer(sdp)
    if isinstance(result, ProtocolError):
        assert result.code == ErrorCode.bad_offer, (result.code, result.message)
        assert result.message.startswith(("unusable SDP offer", "the offer must hold", "the offer holds")), (
            result.message
        )
    else:
        assert AnswerEvent.model_validate_json(result).sdp.startswith("v=0")
    return result


# Values that break parsers: empty, signs, overflow, separators, NUL, non-ASCII, and other SDP keywords.
junk_tokens = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-1",
            "65536",
            "4294967296",
            "99999999999999999999999",
            "1.5",
            "nan",
            ":",
            "/",
            "=",
            "\x00",
            "é",
            "\u202e",
            "udp",
            "tcp",
            "host",
            "relay",
            "typ",
            "opus",
            "sha-256",
            "actpass",
            "active",
            "passive",
            "holdconn",
            "IN",
            "IP6",
            "::1",
            "256.0.0.1",
            "127.0.0.1",
            "0123e456-e89b-12d3-a456-426614174000.local",  # an mDNS host, as browsers send
        ]
    ),
    st.text(max_size=12),
)
# Lines an offer may hold, to insert with their fields mangled.
extra_lines = [
    "m=audio 9 UDP/TLS/RTP/SAVPF 111",
    "m=audio 9 UDP/TLS/RTP/SAVPF",
    "m=video 9 UDP/TLS/RTP/SAVPF 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "m=application 9 DTLS/SCTP 5000",
    "a=rtpmap:111 opus/48000/2",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtcp-fb:111 transport-cc",
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "a=ssrc:1 cname:x",
    "a=ssrc-group:FID 1 2",
    "a=msid:- -",
    "a=mid:1",
    "a=group:BUNDLE 0 1",
    "a=setup:active",
    "a=fingerprint:sha-256 00:11",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:0123456789012345678901",
    "a=ice-lite",
    "a=ice-options:trickle",
    "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
    "a=candidate:2 1 udp 2130706431 0123e456-e89b-12d3-a456-426614174000.local 9 typ host",
    "a=candidate:3 1 tcp 1518280447 127.0.0.1 9 typ host tcptype passive",
    "a=candidate:4 1 udp 1 127.0.0.1 9 typ relay raddr 127.0.0.1 rport 9",
    "a=end-of-candidates",
    "a=sctp-port:5000",
    "a=max-message-size:262144",
    "a=sendonly",
    "a=recvonly",
    "a=inactive",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "c=IN IP4 127.0.0.1",
    "c=IN IP6 ::1",
    "o=- 1 1 IN IP4 0.0.0.0",
    "t=0 0",
]


@st.composite
def mutated_offers(draw: st.DrawFn) -> str:
    lines = real_offer().rstrip("\r\n").split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "repeat", "truncate", "field", "insert", "prefix"]))
        if kind == "delete" and len(lines) > 1:
            del lines[index]
        elif kind == "repeat":
            lines.insert(index, lines[draw(st.integers(0, len(lines) - 1))])
        elif kind == "truncate":
            lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))]
        elif kind == "field":
            # Fields are separated by spaces, and within attributes by ':' and '/' (a=rtpmap:96 opus/48000/2).
            separator = draw(st.sampled_from([" ", ":", "/"]))
            fields = lines[index].split(separator)
            fields[draw(st.integers(0, len(fields) - 1))] = draw(junk_tokens)
            lines[index] = separator.join(fields)
        elif kind == "insert":
            line = draw(st.sampled_from(extra_lines))
            if draw(st.booleans()):
                fields = line.split(" ")
                fields[draw(st.integers(0, len(fields) - 1))] = draw(junk_tokens)
                line = " ".join(fields)
            lines.insert(index, line)
        else:  # the type letter and '=' carry the meaning of a line
            lines[index] = draw(st.sampled_from(["", "a=", "m=", "x=", "=", " "])) + lines[index][2:]
    ending = draw(st.sampled_from(["\r\n", "\n"]))
    return ending.join(lines) + ending


@FUZZ
@given(sdp=mutated_offers())
def test_mutated_offers_are_answered_or_bad_offer(sdp: str) -> None:
    result = check(sdp)
    event("answered" if isinstance(result, str) else result.message[:40])  # in --hypothesis-show-statistics


@FUZZ
@given(sdp=st.one_of(st.text(min_size=1, max_size=200), st.just("v=0\r\n").map(lambda head: head + "m=audio\r\n")))
def test_text_that_is_no_sdp_is_bad_offer(sdp: str) -> None:
    assert isinstance(check(sdp), ProtocolError)


def test_the_real_offer_is_answered() -> None:
    # The baseline the mutations start from: untouched, it is a good offer.
    answered = check(real_offer())
    assert isinstance(answered, str) and json.loads(answered)["type"] == "answer"


def test_an_offer_with_every_audio_section_it_can_fit_is_refused_quickly() -> None:
    # Each section would take a transceiver with its own ICE and DTLS transports: the largest offer a client may
    # send is refused as a whole, not after a long struggle.
    head, _, media = real_offer().partition("m=audio")
    section = "m=audio" + media
    count = (MAX_SDP_BYTES - len(head)) // (len(section) + 8)
    sdp = head + "".join(section.replace("a=mid:0", f"a=mid:{index}") for index in range(count))
    assert len(sdp) <= MAX_SDP_BYTES
    result = check(sdp)
    assert isinstance(result, ProtocolError)
