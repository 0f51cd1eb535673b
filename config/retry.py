"""The one retry policy: exponential backoff with jitter and a cap.

Every loop that waits before trying again (the outbox relay, the publisher,
S3 conditional writes, the SMTP reconnect) takes its delays from a
:class:`RetryPolicy` named here, so the formulas live in one place. How many
attempts each makes stays with its owner (``mail.max_attempts``, the
publisher's limit, the S3 target's ``attempts``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retry ``n`` (1 for the first retry) waits ``base * 2**(n - 1)``
    seconds, at most ``cap``, of which the fraction ``jitter`` is random:
    1.0 is full jitter (anywhere from 0 to the step), 0.0 none. Jitter only
    ever shortens a delay, so a cap is a promise."""

    base: float
    cap: float
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.base <= self.cap and 0 <= self.jitter <= 1):
            raise ValueError(f"not a retry policy: {self!r}")

    def seconds(self, retry: int, *, rng: Callable[[], float] = random.random) -> float:
        step = min(self.cap, self.base * 2.0 ** min(max(0, retry - 1), 64))
        return step * (1.0 - self.jitter * rng())

    def delay(self, retry: int, *, rng: Callable[[], float] = random.random) -> timedelta:
        return timedelta(seconds=self.seconds(retry, rng=rng))


# A notice the mail server did not take: 0.5 s, 1 s, 2 s … up to five minutes.
NOTICE_DELIVERY = RetryPolicy(base=0.5, cap=300.0)
# A publication attempt that failed (storage down, say): 1 s, 2 s … up to a
# minute, well inside the "late rather than never" promise.
PUBLICATION = RetryPolicy(base=1.0, cap=60.0)
# A conditional S3 create that met a 409, throttling, 5xx or a network error,
# on top of botocore's own retries: full jitter, 0.1 s, 0.2 s … up to 2 s.
S3_CREATE = RetryPolicy(base=0.1, cap=2.0, jitter=1.0)
# An SMTP connection the server had closed between two messages: reconnect
# after a pause of up to 50 ms.
SMTP_RECONNECT = RetryPolicy(base=0.05, cap=0.05, jitter=1.0)
