"""The served-certificate cache (common/served_certs.py): callers cannot make us dial in a
loop, and a match is looked at again after a while (addresses move)."""

from __future__ import annotations

from lepton.common import served_certs as sc


async def test_dials_are_bounded_and_matches_expire(monkeypatch):
    dials: list[str] = []

    class Served(sc.ServedCertificates):
        async def _dial(self, address: str) -> str:
            dials.append(address)
            return "v1"

    served = Served(None)
    now = [1000.0]
    monkeypatch.setattr(sc.time, "monotonic", lambda: now[0])
    assert await served.serves("a:1", "v1") == "v1" and dials == ["a:1"]
    assert await served.serves("a:1", "v1") == "v1" and dials == ["a:1"]  # cached
    for _ in range(5):  # another name, again and again: no new dial yet
        assert await served.serves("a:1", "worker") == "v1"
    assert dials == ["a:1"]
    now[0] += sc.RECHECK_S
    assert await served.serves("a:1", "worker") == "v1" and len(dials) == 2
    assert served.known("a:1") == "v1"
    now[0] += sc.CONFIRMED_S
    assert served.known("a:1") == ""
    assert await served.serves("a:1", "v1") == "v1" and len(dials) == 3
    assert await sc.served_by_one_of(served, ["b:2", "a:1"], "v1")
