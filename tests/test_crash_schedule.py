"""Any interleaving of arrivals, crashes and restarts ends with exactly one reply per eligible thread.

Hypothesis generates a schedule: billing emails arrive (each from its own seeded Stripe customer,
so per-sender limits never apply), runs start and may crash, time passes. A run is a fresh
``build_service(...)`` and one ``cycle()``; a crash is :class:`Crash` (a ``BaseException``, so the
pipeline's per-message ``except Exception`` guard cannot swallow it) raised by a thin proxy around
one of the responder's ports at the k-th call of one operation, before or after the real call —
the real Gmail and Stripe clients still do real HTTP against the emulators — after which the
Service is closed without finishing, as a killed process would leave it (SQLite commits are
atomic, so a crash "inside" a ledger write is the same as one just before or after it). One point
is no crash but a lost answer: Gmail stores the reply and answers 503 (``Fault(after=True)``).

After the schedule, clean runs (an hour apart, so back-off waits have passed) go on until a cycle
leaves nothing for later, at most three. Then every delivered email has exactly one reply in its
thread, addressed to its sender and carrying the link of the one portal session minted for it,
the original is labelled replied, and its ledger row is done.

Each schedule runs in one ``[reply] mode``, drawn with it: in draft mode the reply is a draft
(drafts.create where a send would be; the crash points on ``send`` apply to it), nothing is sent,
and the original is labelled drafted.

Why at most one portal session per message holds at every crash point: the idempotency key is
derived from the Gmail id and the reply's Message-ID, recorded (``record_intent``) before the
mint; an attempt interrupted before its send was confirmed is resumed under the same Message-ID,
so Stripe replays the session instead of minting another. Only an idempotency conflict (the
sender's customer changed in between) takes a new key, and this schedule never changes customers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from billing_responder.config import load_config
from billing_responder.ledger import DONE, SqliteLedger
from billing_responder.pipeline import LEFT_FOR_LATER
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import person_mail
from billing_responder.service import Service, build_service
from tests.conftest import Sandbox, text_of
from tests.test_responder import _time_passes

REPLIED = "billing-responder/replied"
DRAFTED = "billing-responder/drafted"
MAX_STEPS = 8
CLEAN_RUNS = 3
EXAMPLES = 100
SEND = r"/messages/send$"
DRAFTS_CREATE = r"/users/me/drafts$"
MODES = ("send", "draft")


class Crash(BaseException):  # the process dying, not an error to handle
    """The run dies here: nothing after this point of the cycle happens."""


@dataclass(frozen=True)
class CrashPoint:
    """Where a run dies: the ``call``-th call of ``port.method``, ``when`` relative to it."""

    port: str  # "mailbox", "billing" or "ledger": the responder attribute wrapped
    method: str  # "send" stands for create_draft in draft mode
    when: str  # "before" (not carried out), "after" (carried out, answer lost), "lost" (503)

    def __str__(self) -> str:
        return f"{self.when} {self.port}.{self.method}"

    def method_in(self, mode: str) -> str:
        """The port method this point wraps in ``mode``."""
        return "create_draft" if mode == "draft" and self.method == "send" else self.method


CRASH_POINTS = [
    CrashPoint("mailbox", "fetch", "before"),
    CrashPoint("ledger", "record_intent", "after"),
    CrashPoint("billing", "create_portal_session", "before"),
    CrashPoint("billing", "create_portal_session", "after"),
    CrashPoint("ledger", "record_session", "before"),
    CrashPoint("mailbox", "send", "before"),
    CrashPoint("mailbox", "send", "after"),
    CrashPoint("mailbox", "send", "lost"),  # no crash: Gmail stored it and answered 503
    CrashPoint("ledger", "record_sent", "before"),
    CrashPoint("mailbox", "find_sent_reply", "after"),
    CrashPoint("mailbox", "modify", "before"),
    CrashPoint("mailbox", "modify", "after"),
    CrashPoint("ledger", "record_done", "before"),
]


@dataclass
class Trigger:
    """The one scheduled crash of a run; ``fired`` once it went off."""

    point: CrashPoint
    call: int
    sandbox: Sandbox
    mode: str = "send"
    calls: int = 0
    fired: bool = False


class CrashingPort:
    """Delegates everything to the real port; the scheduled call of one method crashes."""

    def __init__(self, target: object, method: str, trigger: Trigger) -> None:
        self._target = target
        self._method = method
        self._trigger = trigger

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name != self._method:
            return attribute
        trigger = self._trigger

        def scheduled(*args: Any, **kwargs: Any) -> Any:
            trigger.calls += 1
            if trigger.fired or trigger.calls != trigger.call:
                return attribute(*args, **kwargs)
            trigger.fired = True
            when = trigger.point.when
            if when == "before":
                raise Crash(str(trigger.point))
            if when == "lost":
                path = DRAFTS_CREATE if trigger.mode == "draft" else SEND
                trigger.sandbox.gmail.inject_fault(
                    Fault(503, method="POST", path=path, after=True)
                )
                return attribute(*args, **kwargs)
            attribute(*args, **kwargs)
            raise Crash(str(trigger.point))

        return scheduled


def run(world: World, crash: tuple[CrashPoint, int] | None = None) -> set[str]:
    """One run: start, one cycle (crashing where scheduled), close. What it left for later."""
    sandbox = world.sandbox
    service: Service = build_service(load_config(sandbox.config_path), dry_run=False)
    trigger = None
    if crash is not None:
        point, call = crash
        trigger = Trigger(point, call, sandbox, world.mode)
        responder = service.responder
        method = point.method_in(world.mode)
        setattr(responder, point.port,
                CrashingPort(getattr(responder, point.port), method, trigger))
    try:
        report = service.cycle()
    except Crash:
        return {"crashed"}
    finally:
        service.close()
        sandbox.gmail.clear_faults()  # a "lost" fault never matched is not carried over
        if trigger is not None:
            world.fired += trigger.fired
            if trigger.fired:
                world.events.append(f"crash point fired: {trigger.point}")
    return {o.status.value for o in report.outcomes if o.status in LEFT_FOR_LATER}


# -- the schedule -----------------------------------------------------------------------------

Step = tuple[str, tuple[CrashPoint, int] | None]

deliveries = st.just(("deliver", None))
waits = st.just(("wait", None))
crashes = st.tuples(st.sampled_from(CRASH_POINTS), st.integers(min_value=1, max_value=2))
# Most runs crash somewhere (one in four runs clean), runs and deliveries twice as likely as
# waits, and the first step is always a delivery: a crash needs mail on its way to fire.
runs = st.tuples(st.just("run"), st.none() | crashes | crashes | crashes)
schedules = st.lists(
    st.one_of(deliveries, deliveries, runs, runs, waits), max_size=MAX_STEPS - 1
).map(lambda steps: [("deliver", None), *steps])


@dataclass
class World:
    """What the schedule did: the emails delivered, oldest first."""

    sandbox: Sandbox
    senders: list[str]
    mode: str = "send"  # [reply] mode
    delivered: list[tuple[str, str, str]] = field(default_factory=list)  # gmail id, thread, sender
    fired: int = 0  # how many scheduled crashes (or lost answers) went off
    events: list[str] = field(default_factory=list)  # for Hypothesis's statistics


def fresh_world(sandbox: Sandbox, mode: str = "send") -> World:
    """Empty emulators, no state database, one Stripe customer per possible delivery, and the
    config in ``mode``."""
    text = sandbox.config_path.read_text(encoding="utf-8").replace('mode = "draft"\n', "")
    if mode == "draft":
        text = text.replace("[reply]\n", '[reply]\nmode = "draft"\n')
    sandbox.config_path.write_text(text, encoding="utf-8")
    sandbox.gmail.reset()
    sandbox.stripe.reset()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{sandbox.folder / 'state.db'}{suffix}").unlink(missing_ok=True)
    senders = [f"customer{i}@example.com" for i in range(MAX_STEPS)]
    for i, sender in enumerate(senders):
        sandbox.stripe.add_customer(sender, name=f"Customer {i}")
    return World(sandbox, senders, mode)


def play(world: World, schedule: list[Step]) -> None:
    """Carry the schedule out, then clean runs until a cycle leaves nothing for later."""
    sandbox = world.sandbox
    for kind, crash in schedule:
        if kind == "deliver":
            sender = world.senders[len(world.delivered)]
            subject = f"Invoice question #{len(world.delivered)}"
            gmail_id, thread_id = sandbox.gmail.deliver(person_mail(sender, subject, "Hello?"))
            world.delivered.append((gmail_id, thread_id, sender))
        elif kind == "wait":
            if (sandbox.folder / "state.db").exists():
                _time_passes(sandbox, 3600)
        else:
            run(world, crash)
    for _ in range(CLEAN_RUNS):
        if (sandbox.folder / "state.db").exists():
            _time_passes(sandbox, 3600)
        if not run(world):
            break


def session_owner(idempotency_key: str | None) -> str:
    """The Gmail id a session was minted for: ``billing-responder-<gmail id>-<attempt>``."""
    match = re.fullmatch(r"billing-responder-(.+)-[0-9a-f]{16}", idempotency_key or "")
    assert match, f"unexpected idempotency key {idempotency_key!r}"
    return match.group(1)


def check_exactly_one_reply_each(world: World) -> None:
    """The property: one reply per delivered email, in its thread, labelled, one session each."""
    sandbox = world.sandbox
    replies: defaultdict[str, list[EmailMessage]] = defaultdict(list)
    made = sandbox.gmail.sent_messages()
    label = REPLIED
    if world.mode == "draft":
        assert made == [], "a reply was sent in draft mode"
        made = [draft.message for draft in sandbox.gmail.drafts()]
        label = DRAFTED
    for sent in made:
        replies[sent.thread_id].append(sent.message)
    sessions = defaultdict(list)
    for session in sandbox.stripe.portal_sessions():
        sessions[session_owner(session.idempotency_key)].append(session)
    delivered_threads = {thread_id for _, thread_id, _ in world.delivered}
    assert set(replies) <= delivered_threads, "a reply outside the delivered threads"
    assert set(sessions) <= {gmail_id for gmail_id, _, _ in world.delivered}
    ledger = SqliteLedger(sandbox.folder / "state.db") if world.delivered else None
    try:
        for gmail_id, thread_id, sender in world.delivered:
            in_thread = replies[thread_id]
            assert len(in_thread) == 1, f"{len(in_thread)} replies to {gmail_id} ({sender})"
            assert in_thread[0]["To"] == sender
            assert label in sandbox.gmail.message_label_names(gmail_id)
            minted = sessions[gmail_id]
            assert len(minted) == 1, f"{len(minted)} portal sessions for {gmail_id}"
            assert minted[0].url in text_of(in_thread[0])
            assert ledger is not None
            entry = ledger.get(gmail_id)
            assert entry is not None and entry.state == DONE, entry
    finally:
        if ledger is not None:
            ledger.close()


def describe(schedule: list[Step]) -> str:
    """A schedule as one line, for failure messages."""
    def step(kind: str, crash: tuple[CrashPoint, int] | None) -> str:
        return f"run crashing {crash[0]} #{crash[1]}" if crash else kind
    return "; ".join(step(kind, crash) for kind, crash in schedule)


class TestAnySchedule:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(schedule=schedules, mode=st.sampled_from(MODES))
    def test_arrivals_crashes_and_restarts_end_with_one_reply_per_email(
        self, sandbox: Sandbox, schedule: list[Step], mode: str
    ) -> None:
        """Whatever the schedule and mode, each delivered billing email ends with exactly one reply (or draft), labelled, from one portal session."""
        world = fresh_world(sandbox, mode)
        play(world, schedule)
        for happened in {*world.events, f"{world.fired} crashes fired",
                         f"{len(world.delivered)} emails delivered", f"mode {mode}"}:
            event(happened)
        check_exactly_one_reply_each(world)

    @pytest.mark.parametrize("mode", MODES)
    def test_every_crash_point_is_reached_and_recovered_from(
        self, sandbox: Sandbox, mode: str
    ) -> None:
        """Each crash point fires on an interrupted attempt's resumption, and one reply follows."""
        for point in CRASH_POINTS:
            world = fresh_world(sandbox, mode)
            play(world, [("deliver", None), ("run", (CRASH_POINTS[1], 1)), ("run", (point, 1))])
            assert world.fired == 2, f"{point} was not reached"
            check_exactly_one_reply_each(world)
