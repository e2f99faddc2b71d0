"""The key layout: every key a response's life touches in one script shares one Cluster hash slot."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from runs.admission import new_response
from runs.ids import new_response_id
from runs.request import CreateResponseRequest
from storage.keys import SHARDS, KeySpace, idempotency_shard, shard_of, with_shard

KEYS = KeySpace("rgw")
hex_ids = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda digits: f"resp_{digits}")


def slots(*names: str) -> set[int]:
    return {key_slot(name.encode()) for name in names}


@given(hex_ids, st.integers(0, SHARDS - 1))
def test_an_id_moved_to_a_shard_is_in_it_and_keeps_its_shape(response_id: str, shard: int) -> None:
    moved = with_shard(response_id, shard)
    assert shard_of(moved) == shard
    assert moved[:-2] == response_id[:-2]
    assert len(moved) == len(response_id)


@given(hex_ids)
def test_a_response_and_its_shards_index_and_queue_share_one_slot(response_id: str) -> None:
    assert len(slots(*KEYS.response_keys(response_id), *KEYS.response_index(response_id))) == 1


@given(st.text(max_size=80), st.text(min_size=1, max_size=80))
def test_a_keyed_response_is_made_in_the_slot_of_its_key(scope: str, key: str) -> None:
    request = CreateResponseRequest.model_validate({"model": "m", "input": "hi", "background": True})
    record, _ = new_response(request, owner="gw", idempotency=(scope, key))
    names = [*KEYS.response_keys(record.response_id), *KEYS.response_index(record.response_id)]
    assert shard_of(record.response_id) == idempotency_shard(scope, key)
    assert len(slots(*names, KEYS.idempotency(scope, key))) == 1


@given(st.text(max_size=40))
def test_any_id_maps_to_a_shard(object_id: str) -> None:
    # A client's typo is looked up somewhere, where it is simply not found.
    assert 0 <= shard_of(object_id) < SHARDS


def test_fresh_ids_spread_over_every_shard() -> None:
    seen = {shard_of(new_response_id()) for _ in range(20 * SHARDS)}
    assert seen == set(range(SHARDS))


def test_the_shards_are_not_one_slot() -> None:
    assert len(slots(*(KEYS.run_index(shard) for shard in range(SHARDS)))) == SHARDS
