"""Rollout templates and rollout states in the state store, against both stores: revisions and
If-Match, the audit entry written in the same step, sequence numbers that refuse a stale writer,
and what a second handle (another replica, or the same one after a restart) reads back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from router.state.store import AuditNote, StaleRevision, StateStore

pytestmark = pytest.mark.anyio

TEMPLATE = {"shadow_s": 10.0, "steps": [0.1, 1.0], "step_s": 5.0, "approval": "auto"}


async def test_a_template_is_kept_with_its_revision_and_audited(
    handles: Callable[[], StateStore],
) -> None:
    store = handles()
    revision = await store.put_rollout(
        "fraud", TEMPLATE, expected=0, who="alice", action="rollout_put", reason="ramp v2"
    )
    assert revision == await store.revision()
    assert await handles().rollouts() == {"fraud": (revision, TEMPLATE)}
    entry = (await store.audit("fraud", 1))[0]
    assert (entry.who, entry.action, entry.reason) == ("alice", "rollout_put", "ramp v2")
    assert (entry.before, entry.after, entry.revision) == (None, TEMPLATE, revision)


async def test_a_stale_if_match_changes_nothing(handles: Callable[[], StateStore]) -> None:
    store = handles()
    first = await store.put_rollout(
        "fraud", TEMPLATE, expected=None, who="a", action="rollout_put", reason="r"
    )
    with pytest.raises(StaleRevision) as raised:
        await store.put_rollout(
            "fraud", {**TEMPLATE, "step_s": 1.0}, expected=first + 7, who="b",
            action="rollout_put", reason="r",
        )  # fmt: skip
    assert raised.value.current == first
    with pytest.raises(StaleRevision):  # 0: "no template yet", and there is one
        await store.put_rollout("fraud", TEMPLATE, expected=0, who="b", action="x", reason="r")
    assert await store.rollouts() == {"fraud": (first, TEMPLATE)}
    assert len(await store.audit("fraud", 10)) == 1


async def test_delete_removes_the_template_and_keeps_it_in_the_audit(
    handles: Callable[[], StateStore],
) -> None:
    store = handles()
    first = await store.put_rollout(
        "fraud", TEMPLATE, expected=None, who="a", action="rollout_put", reason="r"
    )
    await store.put_rollout(
        "fraud", None, expected=first, who="a", action="rollout_delete", reason="done"
    )
    assert await handles().rollouts() == {}
    entry = (await store.audit("fraud", 1))[0]
    assert (entry.action, entry.before, entry.after) == ("rollout_delete", TEMPLATE, None)


async def test_state_writes_take_sequence_numbers_and_refuse_a_stale_writer(
    handles: Callable[[], StateStore],
) -> None:
    leader, other = handles(), handles()
    assert await leader.put_rollout_state("fraud", {"phase": "shadow"}, expected=0) == 1
    assert await leader.put_rollout_state("fraud", {"phase": "canary"}, expected=1) == 2
    with pytest.raises(StaleRevision) as raised:  # a deposed leader's write, one step behind
        await other.put_rollout_state("fraud", {"phase": "aborted"}, expected=1)
    assert raised.value.current == 2
    assert await other.rollout_states() == {"fraud": (2, {"phase": "canary"})}
    assert await leader.audit("fraud", 5) == []  # no note: no audit entry


async def test_a_state_write_with_a_note_appends_it_atomically(
    handles: Callable[[], StateStore],
) -> None:
    store = handles()
    await store.put_rollout_state("fraud", {"phase": "awaiting_approval"}, expected=0)
    before = await store.revision()
    note = AuditNote("bob", "approve", "looks good", {"version": "2"})
    assert await store.put_rollout_state("fraud", {"decision": "approved"}, expected=1, note=note)
    entry = (await store.audit("fraud", 1))[0]
    assert (entry.who, entry.action, entry.reason, entry.details) == (
        "bob", "approve", "looks good", {"version": "2"},
    )  # fmt: skip
    assert entry.revision == before + 1 == await store.revision()
    with pytest.raises(StaleRevision):  # refused: neither the state nor the note is written
        await store.put_rollout_state("fraud", {"decision": "rejected"}, expected=1, note=note)
    assert len(await store.audit("fraud", 10)) == 1
    assert (await store.rollout_states())["fraud"] == (2, {"decision": "approved"})
