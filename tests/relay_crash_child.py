"""An outbox relay in its own process that dies (SIGKILL) right after the
mail server took its ``KILL_AFTER``-th message, before the relay recorded it:
the crash the batched records' window is about.

    python -m tests.relay_crash_child DATA_DIR SMTP_PORT KILL_AFTER RECORD_BATCH

Its batches close by count alone (RECORD_WAIT an hour), and it claims as
many rows at once as it records, so where the kill falls in a batch is
certain. Prints ``ready``, then delivers until it dies."""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime, timedelta
from email.message import Message

from config.settings import load_settings
from jobs import relay as relay_module
from jobs.app import build_services
from jobs.mail import Prepared, SmtpMailTransport
from jobs.relay import OutboxRelay


def main() -> int:
    data_dir, port, kill_after, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4])
    relay_module.RECORD_WAIT = timedelta(hours=1)
    relay_module._CLAIM_HOLD = 3600.0  # type: ignore[attr-defined]
    settings = load_settings(environ={}, overrides={"data_dir": data_dir})
    services = build_services(settings)
    sent = [0]

    class Dying(SmtpMailTransport):
        def send(self, message: Message) -> str:
            return self._counted(super().send(message))

        def send_prepared(self, prepared: Prepared, date: datetime) -> str:
            return self._counted(super().send_prepared(prepared, date))

        def _counted(self, where: str) -> str:
            sent[0] += 1
            if sent[0] == kill_after:  # the server has it; the relay has not recorded it
                os.kill(os.getpid(), signal.SIGKILL)
            return where

    relay = OutboxRelay(services, Dying("127.0.0.1", port, security="none"),
                        sender="e@x.example", worker="crash-child", record_batch=batch,
                        lease=timedelta(seconds=1))
    print("ready", flush=True)
    relay.run_once()
    return 0


if __name__ == "__main__":
    sys.exit(main())
