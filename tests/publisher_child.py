"""A publisher in its own process, for the race and crash tests.

    python -m tests.publisher_child DATA_DIR DB_URL RELEASE_ID NAME
        [--setting KEY=VALUE ...] [--start-at EPOCH | --gate]
        [--kill-after K --kill-point after|before-checkpoint]

Prints the outcome's status. ``--setting`` gives the child the same settings
as the test (e.g. ``storage.public=s3://bucket/releases``; S3 credentials come
from the inherited ``AWS_*`` environment). ``--gate``: once ready to publish,
print ``ready`` and read the start time (epoch seconds) from stdin, so racers
start together however long each took to start up. With --kill-after it
SIGKILLs itself after the K-th document was written (``after``: after the
checkpoint committed; ``before-checkpoint``: after the public copy was written
and verified, before the database knew)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from config.settings import load_settings
from jobs.app import build_services
from release.keys import load_private_key
from release.publishing import Publisher


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("db_url")
    parser.add_argument("release_id")
    parser.add_argument("name")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--start-at", type=float)
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--kill-point", default="after")
    parser.add_argument("--lease", type=float, default=2.0)
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.setting)
    overrides.update({"data_dir": args.data_dir, "database.url": args.db_url})
    settings = load_settings(environ={}, overrides=overrides)
    services = build_services(settings)
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant=args.name,
                          lease=timedelta(seconds=args.lease))
    if args.kill_after is not None:
        done = 0
        original_doc = publisher._publish_document
        original_batch = services.public.batch

        def die() -> None:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        @contextmanager
        def batch() -> Iterator[Any]:
            with original_batch() as inner:
                original_publish_file = inner.publish_file

                def publish_file(*a: Any, **kw: Any) -> Any:  # public, not yet checked
                    result = original_publish_file(*a, **kw)
                    if args.kill_point == "before-checkpoint" and done + 1 == args.kill_after:
                        die()
                    return result

                inner.publish_file = publish_file
                yield inner

        def publish_document(*a: Any, **kw: Any) -> int:
            nonlocal done
            found = original_doc(*a, **kw)
            done += 1
            if args.kill_point == "after" and done == args.kill_after:
                die()
            return found

        services.public.batch = batch  # type: ignore[method-assign]
        publisher._publish_document = publish_document  # type: ignore[method-assign]
    start_at = args.start_at
    if args.gate:
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    outcome = publisher.publish(args.release_id, wait_up_to=timedelta(seconds=5))
    print(outcome.status, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
