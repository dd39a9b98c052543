"""The audit trail: records chained by hash and signed at checkpoints, on real SQLite and
PostgreSQL databases and a real SoftHSM token; each kind of tampering done for real in
the database and caught by verify."""

from __future__ import annotations

import sqlalchemy as sa
import pytest

from keysvc.audit import AuditTrail
from keysvc.errors import Unavailable
from keysvc.store import KeyStore
from keysvc.store.audit import AuditStore
from keysvc.store.schema import audit_checkpoints, audit_records
from tests.conftest import run_together


@pytest.fixture
def trail(hsm_token, database_url):
    store = KeyStore.open(database_url)
    yield AuditTrail(hsm_token, AuditStore(store.engine)), store.engine
    store.close()


def write(trail: AuditTrail, count: int) -> None:
    for index in range(count):
        trail.record(identity=f"spiffe://keysvc.dev/key-admin-{index % 2}", operation="keysvc.v1.KeyService/RotateKey",
                     target=f"m/k#{index}", outcome="OK", request_id=f"req{index}")


def update(engine, table, seq, **values) -> None:
    with engine.begin() as connection:
        connection.execute(sa.update(table).where(table.c.seq == seq).values(**values))


def test_an_untouched_trail_verifies_with_a_checkpoint_per_record(trail):
    audit, _engine = trail
    write(audit, 12)

    report = audit.verify(expect_at_least=12)

    assert (report.intact, report.records, report.checkpoints) == (True, 12, 12)
    assert [row.seq for row in audit.read(limit=100)] == list(range(1, 13))
    assert len(audit.read(identity="spiffe://keysvc.dev/key-admin-0")) == 6


def test_an_edited_record_is_named(trail):
    audit, engine = trail
    write(audit, 10)
    update(engine, audit_records, 4, outcome="PERMISSION_DENIED")

    report = audit.verify()

    assert (report.intact, report.first_bad_seq) == (False, 4)
    assert "modified" in report.problem


def test_a_deleted_record_is_named(trail):
    audit, engine = trail
    write(audit, 10)
    with engine.begin() as connection:
        connection.execute(sa.delete(audit_records).where(audit_records.c.seq == 6))

    report = audit.verify()

    assert (report.intact, report.first_bad_seq) == (False, 6)
    assert "missing" in report.problem


def test_swapped_records_are_caught_at_the_first_of_them(trail):
    audit, engine = trail
    write(audit, 10)
    rows = {row.seq: row for row in audit.read(limit=100)}
    fields = ("recorded_at", "identity", "operation", "target", "outcome", "request_id", "prev_hash", "record_hash")
    update(engine, audit_records, 3, **{name: getattr(rows[7], name) for name in fields})
    update(engine, audit_records, 7, **{name: getattr(rows[3], name) for name in fields})

    report = audit.verify()

    assert (report.intact, report.first_bad_seq) == (False, 3)


def test_a_rewritten_chain_is_caught_by_its_signed_checkpoints(trail):
    from keysvc.audit import _hash_of

    audit, engine = trail
    write(audit, 8)
    # Edit record 5 and recompute every hash from there on, as someone with database access could.
    update(engine, audit_records, 5, outcome="OK-ish")
    prev = None
    for row in audit.read(limit=100):
        prev_hash = row.prev_hash if prev is None else prev
        new_hash = _hash_of(row.__class__(**{**row.__dict__, "prev_hash": prev_hash}), prev_hash)
        update(engine, audit_records, row.seq, prev_hash=prev_hash, record_hash=new_hash)
        prev = new_hash

    report = audit.verify()

    assert (report.intact, report.first_bad_seq) == (False, 5)
    assert "checkpoint" in report.problem


def test_a_forged_checkpoint_signature_is_caught(trail):
    audit, engine = trail
    write(audit, 5)
    update(engine, audit_checkpoints, 2, signature=bytes(64))

    report = audit.verify()

    assert (report.intact, report.first_bad_seq) == (False, 2)


def test_removing_the_newest_records_is_caught_against_the_count_noted_before(trail):
    audit, engine = trail
    write(audit, 10)
    noted = audit.verify().records
    with engine.begin() as connection:
        connection.execute(sa.delete(audit_checkpoints).where(audit_checkpoints.c.seq > 7))
        connection.execute(sa.delete(audit_records).where(audit_records.c.seq > 7))

    report = audit.verify(expect_at_least=noted)

    assert (report.intact, report.first_bad_seq) == (False, 8)


def test_records_written_by_many_threads_form_one_chain(trail):
    audit, _engine = trail

    run_together(6, lambda index: write(audit, 15))

    report = audit.verify()
    assert (report.intact, report.records) == (True, 90)


def test_a_trail_that_cannot_be_written_raises_unavailable(trail):
    audit, engine = trail
    write(audit, 1)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE audit_checkpoints"))

    with pytest.raises(Unavailable, match="nothing was done"):
        write(audit, 1)


def test_the_signing_key_is_the_same_for_every_process_on_the_database(trail, hsm_token):
    audit, engine = trail
    write(audit, 3)

    other = AuditTrail(hsm_token, AuditStore(engine))

    assert other.public_key == audit.public_key
    assert other.verify().intact
