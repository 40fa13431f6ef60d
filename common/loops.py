"""The driver shared by the leader's control loops (`run_cycle()` returns a sentence)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def run_cycles(
    what: str,
    run_cycle: Callable[[], Awaitable[str]],
    *,
    interval_s: float | Callable[[], float],
    wakeup: asyncio.Event | None = None,
    gather_s: float = 0.0,
    logger: logging.Logger,
    log: Callable[[str], None] | None = None,
) -> None:
    """Run `run_cycle` forever: after each, wait `interval_s` or until `wakeup` is set
    (then `gather_s` more, so a burst of wake-ups makes one cycle). `interval_s` may be a
    function, asked after each cycle (a loop with nothing to watch can sleep long).

    The sentence is logged only when it changes, so a steady loop logs once: at INFO as
    "what: sentence", or by `log` when given (which may say nothing of routine ones). A
    cycle that raises is logged with its traceback and the loop goes on; cancellation ends it.
    """
    last = ""
    while True:
        interval = interval_s() if callable(interval_s) else interval_s
        if wakeup is None:
            await asyncio.sleep(interval)
        else:
            try:
                await asyncio.wait_for(wakeup.wait(), interval)
                if gather_s > 0:
                    await asyncio.sleep(gather_s)
            except asyncio.TimeoutError:
                pass
            wakeup.clear()
        try:
            sentence = await run_cycle()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s cycle failed", what)
            continue
        if sentence != last:
            if log is None:
                logger.info("%s: %s", what, sentence)
            else:
                log(sentence)
            last = sentence
