"""KeyStore against SQLite and against PostgreSQL (each test runs on both: `database_url`).

No HSM here: the store keeps wrapped keys and binding tags as opaque bytes, so the tests
build Key values with made-up bytes and check what comes back, what concurrent writers
leave behind, and that migrations are safe to run twice and from several threads at once.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from keysvc.errors import AlreadyExists, NotFound
from keysvc.model import Key, KeyAlgorithm, KeyOrigin, KeyPurpose, KeyVersion, KeyVersionState, make_key_id
from keysvc.store import KeyStore, schema_head
from tests.conftest import run_together

MOMENT = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=timezone.utc)


def make_version(number: int, state: KeyVersionState = KeyVersionState.ENABLED) -> KeyVersion:
    return KeyVersion(
        version=number,
        state=state,
        origin=KeyOrigin.IMPORTED if number % 2 else KeyOrigin.GENERATED,
        check_value=f"{number:06X}",
        created_at=MOMENT + timedelta(minutes=number),
        wrapped_key=os.urandom(40),
        wrapping_key_label="keysvc-master-1",
        binding_tag=os.urandom(32),
    )


def make_key(merchant_id: str = "m1", name: str = "sips", versions: int = 1) -> Key:
    return Key(
        key_id=make_key_id(merchant_id, name),
        merchant_id=merchant_id,
        name=name,
        purpose=KeyPurpose.SEAL,
        algorithm=KeyAlgorithm.HMAC_SHA256,
        primary_version=versions,
        created_at=MOMENT,
        updated_at=MOMENT,
        versions=tuple(make_version(n) for n in range(versions, 0, -1)),
    )


def add_next_version(key: Key) -> Key:
    return key.with_version(make_version(max(v.version for v in key.versions) + 1))


@pytest.fixture
def store(database_url):
    opened = KeyStore.open(database_url)
    yield opened
    opened.close()


# -- migrations ------------------------------------------------------------------------------------


def test_opening_twice_migrates_once_and_keeps_the_data(database_url):
    first = KeyStore.open(database_url)
    stored = first.insert_key(make_key())
    first.close()

    second = KeyStore.open(database_url)
    try:
        assert second.load_key(stored.key_id) == stored
        with second.engine.connect() as connection:
            assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [schema_head()]
        assert {"keys", "key_versions", "alembic_version"} <= set(sa.inspect(second.engine).get_table_names())
    finally:
        second.close()


def test_migrating_a_fresh_database_from_four_threads_at_once_succeeds(database_url):
    stores = run_together(4, lambda index: KeyStore.open(database_url))
    try:
        stored = stores[0].insert_key(make_key())
        for store in stores:
            assert store.load_key(stored.key_id) == stored
        with stores[0].engine.connect() as connection:
            assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [schema_head()]
    finally:
        for store in stores:
            store.close()


def test_open_without_migrations_leaves_a_fresh_database_empty(database_url):
    store = KeyStore.open(database_url, run_migrations=False)
    try:
        assert sa.inspect(store.engine).get_table_names() == []
    finally:
        store.close()


# -- reads and inserts ------------------------------------------------------------------------------


def test_insert_then_load_round_trips_every_field(store):
    key = make_key(versions=3)
    key = key.with_version(replace(key.find_version(1), state=KeyVersionState.DESTROYED, wrapped_key=None,
                                   destroyed_at=MOMENT + timedelta(days=1)))

    inserted = store.insert_key(key)
    loaded = store.load_key(key.key_id)

    assert inserted == replace(key, revision=1)
    assert loaded == inserted
    assert [v.version for v in loaded.versions] == [3, 2, 1]
    assert loaded.find_version(1).wrapped_key is None
    assert loaded.created_at == MOMENT
    assert all(v.created_at.tzinfo is not None for v in loaded.versions)
    assert loaded.find_version(3).created_at == MOMENT + timedelta(minutes=3)


def test_load_of_an_unknown_key_returns_none(store):
    assert store.load_key("m1/unknown") is None
    assert store.load_revision("m1/unknown") is None


def test_insert_of_a_taken_key_id_raises_already_exists_and_keeps_the_first(store):
    first = store.insert_key(make_key())

    with pytest.raises(AlreadyExists):
        store.insert_key(make_key(versions=2))

    assert store.load_key(first.key_id) == first


def test_insert_of_a_taken_key_id_from_eight_threads_lets_exactly_one_win(store):
    def insert(index: int):
        try:
            return store.insert_key(make_key())
        except AlreadyExists:
            return None

    results = run_together(8, insert)

    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert store.load_key(winners[0].key_id) == winners[0]


# -- updates ---------------------------------------------------------------------------------------


def test_update_key_writes_the_change_and_bumps_the_revision(store):
    store.insert_key(make_key())

    updated = store.update_key("m1/sips", lambda key: replace(add_next_version(key), primary_version=2))

    assert updated.revision == 2
    assert updated.primary_version == 2
    assert store.load_key("m1/sips") == updated
    assert store.load_revision("m1/sips") == 2


def test_update_key_returning_the_same_key_writes_nothing(store):
    inserted = store.insert_key(make_key())

    unchanged = store.update_key("m1/sips", lambda key: key)

    assert unchanged.revision == 1
    assert store.load_key("m1/sips") == inserted


def test_update_key_persists_a_changed_version_and_leaves_the_others_alone(store):
    inserted = store.insert_key(make_key(versions=2))

    def retire_and_destroy(key: Key) -> Key:
        return key.with_version(replace(key.find_version(1), state=KeyVersionState.DESTROYED, wrapped_key=None,
                                        destroyed_at=MOMENT))

    updated = store.update_key("m1/sips", retire_and_destroy)

    loaded = store.load_key("m1/sips")
    assert loaded == updated
    assert loaded.find_version(1).state is KeyVersionState.DESTROYED
    assert loaded.find_version(1).wrapped_key is None
    assert loaded.find_version(2) == inserted.find_version(2)


def test_update_key_of_an_unknown_key_raises_not_found(store):
    with pytest.raises(NotFound):
        store.update_key("m1/unknown", add_next_version)


def test_update_key_whose_change_raises_writes_nothing(store):
    inserted = store.insert_key(make_key())

    class Refused(Exception):
        pass

    def refuse(key: Key) -> Key:
        add_next_version(key)  # computed, then refused
        raise Refused()

    with pytest.raises(Refused):
        store.update_key("m1/sips", refuse)

    assert store.load_key("m1/sips") == inserted
    assert store.load_revision("m1/sips") == 1


def test_update_key_calls_the_change_again_when_another_writer_got_there_first(store):
    store.insert_key(make_key())
    seen_revisions: list[int] = []

    def change(key: Key) -> Key:
        seen_revisions.append(key.revision)
        if len(seen_revisions) == 1:
            # Another writer commits between this writer's read and its write.
            store.update_key("m1/sips", add_next_version)
        return add_next_version(key)

    updated = store.update_key("m1/sips", change)

    assert seen_revisions == [1, 2]
    assert updated.revision == 3
    assert [v.version for v in store.load_key("m1/sips").versions] == [3, 2, 1]


def test_update_key_from_eight_threads_loses_no_update(store):
    store.insert_key(make_key())

    def add_one(index: int) -> int:
        added: list[int] = []

        def change(key: Key) -> Key:
            changed = add_next_version(key)
            added[:] = [changed.versions[0].version]
            return changed

        stored = store.update_key("m1/sips", change)
        assert stored.find_version(added[0]) is not None
        return added[0]

    added_versions = run_together(8, add_one)

    final = store.load_key("m1/sips")
    assert sorted(added_versions) == list(range(2, 10))
    assert [v.version for v in final.versions] == list(range(9, 0, -1))
    assert final.revision == 9


def test_load_revision_follows_every_update(store):
    store.insert_key(make_key())
    revisions = [store.load_revision("m1/sips")]

    for _ in range(3):
        store.update_key("m1/sips", add_next_version)
        revisions.append(store.load_revision("m1/sips"))

    assert revisions == [1, 2, 3, 4]


# -- listing ---------------------------------------------------------------------------------------


def test_list_keys_orders_by_key_id_filters_by_merchant_and_pages_with_after_and_limit(store):
    ids = ["m2/b", "m1/c", "m10/a", "m1/a", "m2/a", "m1/b"]
    for key_id in ids:
        merchant_id, name = key_id.split("/")
        store.insert_key(make_key(merchant_id, name))

    everything = store.list_keys(merchant_id=None, after_key_id="", limit=100)
    m1 = store.list_keys(merchant_id="m1", after_key_id="", limit=100)
    m1_after_a = store.list_keys(merchant_id="m1", after_key_id="m1/a", limit=1)
    tail = store.list_keys(merchant_id=None, after_key_id="m10/a", limit=100)

    assert [key.key_id for key in everything] == sorted(ids)
    assert [key.key_id for key in m1] == ["m1/a", "m1/b", "m1/c"]
    assert [key.key_id for key in m1_after_a] == ["m1/b"]
    assert [key.key_id for key in tail] == ["m2/a", "m2/b"]
    assert store.list_keys(merchant_id="m3", after_key_id="", limit=100) == []


def test_list_keys_returns_each_key_with_its_versions_and_revision(store):
    store.insert_key(make_key("m1", "a", versions=2))
    store.insert_key(make_key("m1", "b", versions=1))
    store.update_key("m1/b", add_next_version)

    listed = store.list_keys(merchant_id="m1", after_key_id="", limit=10)

    assert listed == [store.load_key("m1/a"), store.load_key("m1/b")]
    assert [len(key.versions) for key in listed] == [2, 2]
    assert [key.revision for key in listed] == [1, 2]
