"""An outbox relay in its own process, heartbeating like an ``embargo run``
node, for the crash tests.

    python -m tests.relay_child DATA_DIR DB_URL SMTP_PORT

Prints ``ready`` once its node is registered, then delivers until killed."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from config.settings import load_settings
from jobs.app import build_services
from jobs.mail import SmtpMailTransport
from jobs.nodes import NodeMonitor
from jobs.relay import OutboxRelay


def main() -> int:
    data_dir, db_url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = load_settings(environ={}, overrides={"data_dir": data_dir,
                                                    "database.url": db_url})
    services = build_services(settings)
    name = "relay-child"
    monitor = NodeMonitor(services, name, max_skew=timedelta(seconds=1), heartbeat_every=0.5)
    monitor.start()

    def connect() -> SmtpMailTransport:
        return SmtpMailTransport("127.0.0.1", port, security="none", timeout=30)

    relay = OutboxRelay(services, connect(), sender="e@x.example", worker=name, workers=4,
                        make_transport=connect, lease=timedelta(seconds=3))
    print("ready", flush=True)
    while True:
        relay.run_once()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
