"""How often a site reads its posting: soon after something moved, then less and less often while nothing does.

A round posts a site's next task seconds after the site answered its last one (the coordinator
aggregates, then posts), so a site that has just answered, or whose posting just changed, reads
again after `FASTEST` seconds, and each read that finds nothing new waits `GROWTH` times longer,
up to `ACTIVE` seconds while its training runs and the participation's ``pollSeconds`` otherwise.
Every read is conditional (`Store.read_if_changed`): an unchanged posting costs one request
without a body. So a site sees its next task well under a second after it is posted when the
round moves quickly (the next task follows its answer), within `ACTIVE` seconds after a long wait
for the others, and, idle, costs one request every ``pollSeconds`` (the default 30 s: about a
million requests a year, under half a dollar at AWS S3's GET price). Shared by ``fedtrain site
run`` and the site operator.

A store in a directory (one machine, or a shared filesystem) charges nothing per read and answers
in microseconds, so there a site reads every `LOCAL_FASTEST` seconds after something moved and at
most every `LOCAL_ACTIVE` seconds while the training runs: it sees its next task a few hundredths
of a second after it is posted, for a fraction of a percent of a core. Idle, it still waits
``pollSeconds``. The site operator keeps the object store's pace whatever its store: each of its
passes also lists the site's Jobs from the API server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FASTEST = 0.2  # seconds: the first wait after something moved
GROWTH = 1.5  # each read that finds nothing new waits this much longer
ACTIVE = 5.0  # seconds: the longest wait while the site's training runs (its posting says Running)
LOCAL_FASTEST = 0.05  # seconds: the same for a store whose reads are local file reads (`Store.reads_are_local`)
LOCAL_ACTIVE = 0.1


@dataclass
class Pace:
    """The wait before the next read, from what the last reads found."""

    slowest: float  # spec.pollSeconds: never longer than this
    fastest: float = FASTEST
    growth: float = GROWTH
    active: float = ACTIVE
    current: float = field(init=False)

    @classmethod
    def for_store(cls, poll_seconds: float, reads_are_local: bool) -> Pace:
        """The pace for a store: `LOCAL_FASTEST` and `LOCAL_ACTIVE` where reads are free, else S3's."""
        if reads_are_local:
            return cls(poll_seconds, fastest=LOCAL_FASTEST, active=LOCAL_ACTIVE)
        return cls(poll_seconds)

    def __post_init__(self) -> None:
        self.current = min(self.fastest, self.slowest)

    def follow(self, running: bool, poll_seconds: float) -> None:
        """While the training runs, never wait longer than ``active``; otherwise up to ``pollSeconds``."""
        self.slowest = min(self.active, poll_seconds) if running else poll_seconds
        self.current = min(self.current, self.slowest)

    def moved(self) -> None:
        """Something happened (a new posting, a task that ended): read again soon."""
        self.current = min(self.fastest, self.slowest)

    def next_wait(self) -> float:
        """The wait before the next read; the one after it is longer, up to ``slowest``."""
        wait = self.current
        self.current = min(self.slowest, self.current * self.growth)
        return wait
