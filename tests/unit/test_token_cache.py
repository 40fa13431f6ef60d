"""A worker's token cache (agent/token_cache.py): voters' answers kept briefly, failures not
kept, one question per token at a time, and a cap on questions a second."""

from __future__ import annotations

import asyncio

from lepton.agent import token_cache as tc
from lepton.common.auth import Principal, Role
from lepton.common.errors import Unavailable

ALICE = Principal("alice", Role.USER)


class Voter:
    def __init__(self, answers: dict[str, Principal | None]):
        self.answers = answers
        self.asked: list[str] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, token: str) -> Principal | None:
        self.asked.append(token)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise Unavailable("no leader")
        return self.answers.get(token)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_briefly_and_failures_not_at_all():
    async def go():
        voter, clock = Voter({"lep_alice": ALICE}), Clock()
        cache = tc.TokenCache(voter, clock=clock)
        assert cache.lookup("lep_alice") is None  # nothing before a resolve
        await cache.resolve("lep_alice")
        await cache.resolve("lep_alice")
        assert cache.lookup("lep_alice") == ALICE and voter.asked == ["lep_alice"]
        clock.now += tc.VALID_S
        assert cache.lookup("lep_alice") is None  # revocation reaches workers this late at most
        voter.answers.clear()
        await cache.resolve("lep_alice")
        assert cache.lookup("lep_alice") is None and len(voter.asked) == 2
        clock.now += tc.INVALID_S
        voter.down = True
        await cache.resolve("lep_alice")  # never raises
        await cache.resolve("lep_alice")
        assert cache.lookup("lep_alice") is None and len(voter.asked) == 4  # no answer: asked again

    asyncio.run(go())


def test_what_is_not_a_token_is_never_asked_about():
    async def go():
        voter = Voter({})
        cache = tc.TokenCache(voter, clock=Clock())
        for junk in ("Basic abc", "x" * 10, "lep_" + "a" * tc.MAX_TOKEN_CHARS):
            await cache.resolve(junk)
        assert voter.asked == []

    asyncio.run(go())


def test_concurrent_calls_share_one_question():
    async def go():
        voter = Voter({"lep_alice": ALICE})
        voter.gate = asyncio.Event()
        cache = tc.TokenCache(voter, clock=Clock())
        waits = [asyncio.create_task(cache.resolve("lep_alice")) for _ in range(5)]
        await asyncio.sleep(0.01)
        voter.gate.set()
        await asyncio.gather(*waits)
        assert voter.asked == ["lep_alice"] and cache.lookup("lep_alice") == ALICE

    asyncio.run(go())


def test_a_flood_of_made_up_tokens_is_not_passed_on():
    async def go():
        voter, clock = Voter({}), Clock()
        cache = tc.TokenCache(voter, clock=clock)
        for i in range(int(tc.MAX_ASKS_PER_S) * 3):
            await cache.resolve(f"lep_{i}")
        assert len(voter.asked) == int(tc.MAX_ASKS_PER_S)
        clock.now += 1.0  # the allowance refills
        await cache.resolve("lep_next")
        assert voter.asked[-1] == "lep_next"

    asyncio.run(go())
