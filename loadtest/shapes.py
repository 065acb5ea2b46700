"""Load shapes as pure functions of the time since the start: (users, spawn rate) or None to stop.

`black_friday` follows the story's peak in miniature, over `duration` seconds:

    users
    2x peak |                 ##
    peak    |        #########  #########
            |     ###                    ###
    10%     |  ###                          ###
            +-------------------------------------> time
              ramp 20% | hold 25% | spike 10% | hold 25% | ramp down 20%
"""

from __future__ import annotations

MAX_SPAWN_RATE = 100

# (fraction of the run at which the phase ends, users at its start, users at its end), in peaks.
PHASES = (
    (0.20, 0.1, 1.0),  # doors open: ramp to the peak
    (0.45, 1.0, 1.0),  # the peak hour
    (0.55, 2.0, 2.0),  # the spike: a deal goes viral
    (0.80, 1.0, 1.0),  # back to the peak
    (1.00, 1.0, 0.1),  # ramp down
)


def black_friday(now: float, duration: float, peak: int) -> tuple[int, float] | None:
    """Users wanted `now` seconds into a `duration`-second Black Friday with `peak` users."""
    if now >= duration:
        return None
    position = now / duration
    begin = 0.0
    step = max(1, peak // 10)  # ramps go in tenths of the peak, not a new target every tick
    for end, first, last in PHASES:
        if position < end:
            share = first + (last - first) * (position - begin) / (end - begin)
            users = max(1, round(peak * share / step) * step)
            # Fast enough that the spike lands within a second or two; Locust warns above 100.
            return users, float(min(MAX_SPAWN_RATE, max(1, 2 * peak)))
        begin = end
    return None


def steady(
    now: float, duration: float | None, users: int, spawn_rate: float | None
) -> tuple[int, float] | None:
    """`users` for `duration` seconds (forever when None), started at `spawn_rate` a second."""
    if duration is not None and now >= duration:
        return None
    return users, float(spawn_rate or min(MAX_SPAWN_RATE, max(1, users)))
