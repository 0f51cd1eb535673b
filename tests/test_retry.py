"""The one retry policy: exponential, capped, jittered, shared by every loop
that tries again."""

from __future__ import annotations

import smtplib
from datetime import timedelta
from typing import Any

import pytest

from config.retry import NOTICE_DELIVERY, PUBLICATION, S3_CREATE, SMTP_RECONNECT, RetryPolicy
from jobs.mail import SmtpMailTransport


def test_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=3.0, jitter=0.0)
    assert [policy.seconds(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.delay(1) == timedelta(seconds=0.5)
    assert policy.seconds(10_000) == 3.0  # a huge retry count does not overflow


def test_jitter_only_shortens_and_stays_within_its_fraction() -> None:
    half = RetryPolicy(base=1.0, cap=8.0, jitter=0.5)
    assert half.seconds(3, rng=lambda: 0.0) == 4.0  # no luck: the full step, never more
    assert half.seconds(3, rng=lambda: 0.999999) == pytest.approx(2.0, abs=1e-5)
    full = RetryPolicy(base=1.0, cap=8.0, jitter=1.0)
    assert full.seconds(3, rng=lambda: 0.999999) == pytest.approx(0.0, abs=1e-5)
    for _ in range(200):
        assert 2.0 < half.seconds(3) <= 4.0


@pytest.mark.parametrize("bad", [dict(base=2.0, cap=1.0), dict(base=-1.0, cap=1.0),
                                 dict(base=1.0, cap=2.0, jitter=1.5)])
def test_a_policy_that_makes_no_sense_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)


def test_the_named_policies_keep_their_caps() -> None:
    assert NOTICE_DELIVERY.seconds(100, rng=lambda: 0.0) == 300.0
    assert PUBLICATION.seconds(100, rng=lambda: 0.0) == 60.0
    assert S3_CREATE.seconds(100, rng=lambda: 0.0) == 2.0
    assert SMTP_RECONNECT.seconds(1, rng=lambda: 0.0) == 0.05


class _Closing:
    """An SMTP connection the server closes on the first send."""

    sock = None  # no socket whose timeouts close() would set

    def __init__(self, sent: list[Any], fail: bool) -> None:
        self.sent, self.fail = sent, fail

    def send_message(self, message: Any) -> None:
        if self.fail:
            raise smtplib.SMTPServerDisconnected("closed")
        self.sent.append(message)

    def quit(self) -> None:
        return None


def test_the_smtp_reconnect_waits_by_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []
    slept: list[float] = []
    connections = iter([_Closing(sent, True), _Closing(sent, False)])
    transport = SmtpMailTransport("127.0.0.1", 25, security="none", sleep=slept.append)
    monkeypatch.setattr(transport, "_connect", lambda: next(connections))
    assert transport.send("message") == "smtp://127.0.0.1:25"  # type: ignore[arg-type]
    assert sent == ["message"]
    assert len(slept) == 1 and 0 <= slept[0] <= SMTP_RECONNECT.cap
