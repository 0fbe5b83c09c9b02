from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenfirewall.keys import Keys, encode_user_id


def test_plain_ids_appear_as_they_are() -> None:
    assert encode_user_id("user-42@example.com") == "user-42@example.com"
    assert Keys().budget("u1", "2026-12") == "tokenfirewall:budget:{u1}:2026-12"


@given(st.text(max_size=300), st.text(max_size=300))
def test_encoding_is_injective_and_tag_safe(a: str, b: str) -> None:
    ea, eb = encode_user_id(a), encode_user_id(b)
    assert (ea == eb) == (a == b)
    for encoded in (ea, eb):
        assert "{" not in encoded
        assert "}" not in encoded
        assert len(encoded) <= 130
        assert encoded.isascii()
