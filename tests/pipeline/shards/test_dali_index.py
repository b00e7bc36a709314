"""DALI's ``.idx`` format (what ``wds2idx`` writes): formatting and parsing round trip."""

from __future__ import annotations

import pytest

from unmix.pipeline.shards.dali_index import Member, format_index, parse_index


def test_index_format_round_trip():
    members = [Member("000.jpg", 512, 10), Member("000.cls", 1536, 1), Member("001.jpg", 2560, 700)]
    text = format_index(members)
    assert text == "v1.2 2\njpg 512 10 000.jpg cls 1536 1 000.cls\njpg 2560 700 001.jpg\n"
    assert parse_index(text) == [members[:2], members[2:]]
    with pytest.raises(ValueError, match="header says 3"):
        parse_index(text.replace("v1.2 2", "v1.2 3"))
