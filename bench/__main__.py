"""``python -m bench``: the whole bench in one command; writes ``<out>/latest.json`` and ``<out>/latest.md``.

    python -m bench [--quick] [--models logreg,forest,mlp,cnn] [--rounds 3] [--out bench/results]

See docs/performance.md for the method. The optional parts (``bench.lambda_bench``, ``bench.cold_start``)
run too unless ``--skip-optional``: each exposes ``run(models, quick) -> list[dict]``. The peers (KServe,
MLServer) are HTTP systems of the same run: add ``kserve,mlserver`` to ``--systems``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench import http_bench, report
from bench.models import DEFAULT_CACHE, generate

OPTIONAL = ("bench.lambda_bench", "bench.cold_start")
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s per point instead of 10 s")
    parser.add_argument("--models", default="logreg,forest,mlp,cnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None, help="seconds per point (overrides --quick)")
    parser.add_argument("--systems", default=",".join(http_bench.ALL_SYSTEMS),
                        help="from raw,engine,bare,fastapi,maas,kserve,mlserver (peers: own venvs, built on first use)")
    parser.add_argument("--skip-optional", action="store_true", help="skip lambda_bench and cold_start")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    options = parser.parse_args(argv)
    started = time.monotonic()
    models = generate(options.models.split(","), DEFAULT_CACHE)
    results = http_bench.run(models, quick=options.quick, rounds=options.rounds,
                             systems=tuple(options.systems.split(",")), duration=options.duration)
    if not options.skip_optional:
        for name in OPTIONAL:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    print(f"{name}: skipped, missing {exc.name}", file=sys.stderr)
                continue
            if not callable(getattr(module, "run", None)):
                continue
            print(f"running {name}")
            try:
                results += module.run(models, options.quick)
            except Exception as exc:  # one optional part failing must not lose the rest of the run
                print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    duration = options.duration if options.duration is not None else (1.0 if options.quick else 10.0)
    note = f"{options.rounds} rounds, {duration:g} s per point, models {options.models}"
    json_path, md_path = report.write(results, options.out, note)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
