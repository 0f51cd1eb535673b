"""Dead man's switch: each node requests ``alerts.heartbeat_url`` every
``alerts.heartbeat_every`` seconds, so an outside service (of the
healthchecks.io kind) raises the alarm when every node is down. A failure to
reach it is logged, never fatal."""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, url: str, *, every: float = 60.0, timeout: float = 5.0,
                 node: str = "", healthy: Callable[[], bool] = lambda: True) -> None:
        """``healthy``: whether this node could publish just now (its clock
        trusted, its database answering); a node that could not stays
        silent, so the outside service raises the alarm if none can."""
        self.url = url
        self.healthy = healthy
        self.skipped = 0
        self.every = every
        self.timeout = min(timeout, every)
        self.node = node
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ping(self) -> bool:
        """One request, bounded by ``timeout``. True when the service answered 2xx."""
        request = urllib.request.Request(self.url, headers={
            "User-Agent": f"embargo-heartbeat/{self.node or 'node'}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read(1024)
                ok = 200 <= int(response.status) < 300
        except (OSError, urllib.error.URLError, ValueError) as exc:
            self.failed += 1
            log.warning("heartbeat to %s failed (%s); carrying on", self.url, exc)
            return False
        if ok:
            self.sent += 1
        return ok

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="embargo-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.healthy():
                    self.ping()
                else:
                    self.skipped += 1
                    log.warning("heartbeat to %s withheld: this node cannot publish just now",
                                self.url)
            except Exception:  # never let the switch take the node down
                log.exception("heartbeat failed unexpectedly; carrying on")
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
