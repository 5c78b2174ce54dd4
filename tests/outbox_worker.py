"""Run an Outbox in its own process, as the service would, for the kill -9 test.

    python -m tests.outbox_worker DB URL TOKEN [--put CALLS PER_CALL] [--concurrency N]

Prints "queued" once the commands are committed, then delivers until the
outbox is empty ("drained") or the process is killed.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from fsbridge.outbox import Outbox  # noqa: E402
from fsbridge.planfix import Credentials, PlanfixClient  # noqa: E402
from tests.outbox_helpers import many_calls  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--put", nargs=2, type=int, metavar=("CALLS", "PER_CALL"))
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    client = PlanfixClient(lambda: Credentials(args.url, args.token), connect_timeout=1, read_timeout=5, pool_size=args.concurrency)
    outbox = Outbox(args.db, client, concurrency=args.concurrency, min_backoff_s=0.05, max_backoff_s=0.2)
    if args.put:
        outbox.put(many_calls(*args.put))
    print("queued", flush=True)
    outbox.start()
    while outbox.stats()["depth"]:
        time.sleep(0.02)
    outbox.stop(drain_timeout=2)
    print("drained", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
