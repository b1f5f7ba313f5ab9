from __future__ import annotations

import pytest

from pgraft import contract


def test_sample_keys_round_trip():
    assert contract.sample_key(17, 3) == "p000017_s00003"
    assert contract.parse_sample_key("p000017_s00003") == (17, 3)
    with pytest.raises(ValueError):
        contract.parse_sample_key("p17_s3")


def test_layout_matches_design():
    assert contract.shard_key(0, 17) == "round-000/generate/shard-000017.tar"
    assert contract.commit_key(1, 17) == "round-001/generate/shard-000017.json"
    assert contract.shard_id_of("round-000/generate/shard-000017.json") == 17
    assert contract.rewards_prefix(0, "digits_alignment") == "round-000/rewards/digits_alignment"


def test_seeds_are_deterministic_and_distinct():
    a = contract.sample_seed(0, 0, 1, 2)
    assert a == contract.sample_seed(0, 0, 1, 2)
    others = {contract.sample_seed(*args) for args in [(1, 0, 1, 2), (0, 1, 1, 2), (0, 0, 2, 1), (0, 0, 1, 3)]}
    assert a not in others and len(others) == 4
    assert 0 <= a < 2**63
