"""``python -m infra.local`` (``make stack-local``): synthesize the app and run the stage on 127.0.0.1.

Prints ``MAAS_URL=...`` and ``MAAS_TOKEN=...`` on stdout once it serves, then serves until
interrupted. ``STACK_PORT`` (default 4566), ``STACK_STAGE`` (default dev), ``STACK_POOLS=1`` (the
container-image pool too); ``--assembly DIR`` runs an existing ``cdk synth`` output instead."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from infra.local.stack import LocalStack
from infra.local.synth import synthesize
from infra.local.template import Assembly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assembly", type=Path, help="a cdk.out directory to run (default: synthesize now)")
    parser.add_argument("--stage", default=os.environ.get("STACK_STAGE", "dev"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("STACK_PORT", "4566")))
    parser.add_argument("--pools", action="store_true", default=os.environ.get("STACK_POOLS") == "1",
                        help="container pools on (the image inference pool); no Docker is needed locally")
    parser.add_argument("--workdir", type=Path,
                        help="where the functions' /tmp, downloads and the synthesis go (default: a temporary dir)")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maas-stack-local-", dir=arguments.workdir) as scratch:
        workdir = Path(scratch)
        stack_name = f"maas-{arguments.stage}"
        directory = arguments.assembly or synthesize(workdir / "cdk.out", arguments.stage, pools=arguments.pools)
        print(f"local stack: running {stack_name} from {directory}", file=sys.stderr, flush=True)
        stack = LocalStack(Assembly.load(directory, stack_name), port=arguments.port, workdir=workdir).start()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            for skipped in stack.skipped:
                print(f"local stack: not run locally: {skipped}", file=sys.stderr)
            print(f"MAAS_URL={stack.url}", flush=True)
            print(f"MAAS_TOKEN={stack.token}", flush=True)
            print(f"local stack: serving (moto at {stack.moto_url}); Ctrl-C stops it", file=sys.stderr, flush=True)
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
