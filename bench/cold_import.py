"""Cold import of each Lambda handler module, in fresh processes (not a test).

What a cold start pays before the first request: importing the handler and its module-level init
(settings, boto3 clients, engine, caches). Prints the median wall time over ``--rounds`` fresh
interpreters per handler, the same for bare ``import numpy, onnxruntime`` (the floor any ONNX server
pays) with the ratio to it, and the heaviest top-level packages from ``-X importtime`` of one run.
Fake credentials and resource names only: nothing is contacted (boto3 clients connect lazily).

    python bench/cold_import.py [--rounds N] [--handlers inference api deploy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    "MAAS_BUCKET": "bench-bucket", "MAAS_TABLE": "bench-table", "POWERTOOLS_METRICS_NAMESPACE": "maas",
}
LOAD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["handler"] = module
spec.loader.exec_module(module)
"""
FLOOR = "import numpy, onnxruntime"


def run(code: str, *args: str, importtime: bool = False) -> tuple[float, str]:
    env = {**os.environ, **ENV, "MAAS_HOME": str(REPO / "build" / "bench-home")}
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code, *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, done.stderr


def heaviest(importtime_log: str, top: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (µs column 2 of ``-X importtime``)."""
    totals: dict[str, float] = {}
    for line in importtime_log.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if name.startswith(" ") and not name.startswith("  "):  # depth 1: a top-level import
            package = name.strip().split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(parts[1]) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--handlers", nargs="+", default=["inference", "api", "deploy"])
    options = parser.parse_args()
    floor = statistics.median(run(FLOOR)[0] for _ in range(options.rounds))
    print(f"{'what':<28} {'median s':>9} {'x floor':>8}")
    print(f"{'numpy + onnxruntime (floor)':<28} {floor:>9.3f} {1.0:>8.2f}")
    for name in options.handlers:
        path = str(REPO / "functions" / name / "handler.py")
        seconds = statistics.median(run(LOAD, path)[0] for _ in range(options.rounds))
        print(f"{name + ' handler':<28} {seconds:>9.3f} {seconds / floor:>8.2f}")
        _, log = run(LOAD, path, importtime=True)
        print("    heaviest: " + ", ".join(f"{package} {cost:.3f}" for package, cost in heaviest(log)))


if __name__ == "__main__":
    main()
