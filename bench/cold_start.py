"""Cold start of the inference Lambda handler in fresh processes (not a test).

Each sample is a fresh ``python -I`` interpreter that imports ``functions/inference/handler.py`` (its
module-level init: settings, boto3 clients, engine, caches) and answers its first OIP v2 JSON request:

* ``cached``: the model is already in the ``/tmp`` artifact cache (``MAAS_ARTIFACT_CACHE_DIR``, filled by a
  first process); the route and the token still come from DynamoDB (moto), as on Lambda;
* ``s3``: an empty cache, so the artifact is fetched from S3 (moto) first.

AWS is ``moto.server.ThreadedMotoServer`` on 127.0.0.1 in this process, reached by the child through
``MAAS_AWS_ENDPOINT_URL``. Reported (median over samples): wall time from spawning the process to the
answer, the import part alone, and the child's peak RSS (``VmHWM`` of ``/proc/self/status``: ``ru_maxrss``
survives ``exec`` and would report the parent's). The floor is a fresh ``import numpy, onnxruntime``.
Also checked: the API handler's import path does not load onnxruntime. Target (issue 7): <= 0.3 s.

    python -m bench.cold_start [--model PATH] [--quick] [--samples N]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.lambda_bench import (
    BUCKET,
    FAKE_AWS,
    REPO,
    TABLE,
    answer_outputs,
    deploy_models,
    environment,
    models_from_args,
    oip_json_body,
    same_outputs,
    sample_inputs,
)

SYSTEM = "lambda-cold-start"
CHILD = """
import time
t0 = time.time()
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["handler"] = module
spec.loader.exec_module(module)
t1 = time.time()
event = json.loads(open(sys.argv[2]).read())
answer = module.handler(event, None)
t2 = time.time()
rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
sys.stderr.write("BENCH " + json.dumps({"t0": t0, "imported": t1, "answered": t2, "rss": rss,
                                        "onnxruntime": "onnxruntime" in sys.modules, "answer": answer}) + "\\n")
"""
FLOOR = """
import time
t0 = time.time()
import json, sys
import numpy, onnxruntime
t1 = time.time()
rss = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
sys.stderr.write("BENCH " + json.dumps({"t0": t0, "imported": t1, "answered": t1, "rss": rss,
                                        "onnxruntime": True, "answer": None}) + "\\n")
"""
API_IMPORT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["handler"] = module
spec.loader.exec_module(module)
sys.stderr.write("BENCH " + json.dumps({"onnxruntime": "onnxruntime" in sys.modules,
                                        "numpy": "numpy" in sys.modules}) + "\\n")
"""


def spawn(code: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    spawned = time.time()
    done = subprocess.run([sys.executable, "-I", "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    sample: dict[str, Any] = json.loads(lines[-1][len("BENCH "):])
    sample["spawned"] = spawned
    return sample


def run(models: dict[str, Path], quick: bool, samples: int | None = None) -> list[dict[str, Any]]:
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    from tests.functions import api_event

    samples = samples or (3 if quick else 9)
    name, path = next(iter(models.items()))  # one model: cold start is about imports and the first call
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = sample_inputs(session)
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    results: list[dict[str, Any]] = []

    def add(scenario: str, metric: str, value: float, unit: str, match: bool = True) -> None:
        results.append({"system": SYSTEM, "model": name, "scenario": scenario, "metric": metric,
                        "value": float(value), "unit": unit, "outputs_match": bool(match)})

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per moto request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with tempfile.TemporaryDirectory(prefix="maas-cold-start-") as scratch, environment(FAKE_AWS):
            token = deploy_models({name: path}, Path(scratch) / "home", endpoint_url=endpoint)
            event_file = Path(scratch) / "event.json"
            event = api_event("v2_http_json_infer_default", model=name, token=token, body=oip_json_body(feeds),
                              path=f"/v2/models/{name}/infer")
            event_file.write_text(json.dumps(event))
            base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": scratch, **FAKE_AWS,
                    "MAAS_BUCKET": BUCKET, "MAAS_TABLE": TABLE, "MAAS_AWS_ENDPOINT_URL": endpoint,
                    "MAAS_HOME": f"{scratch}/home", "POWERTOOLS_METRICS_NAMESPACE": "maas",
                    "POWERTOOLS_TRACE_DISABLED": "true"}
            handler = str(REPO / "functions" / "inference" / "handler.py")
            cache = Path(scratch) / "cache"
            spawn(CHILD, [handler, str(event_file)], {**base, "MAAS_ARTIFACT_CACHE_DIR": str(cache)})  # fills it
            runs: dict[str, list[dict[str, Any]]] = {"floor: import numpy, onnxruntime": [], "cached": [], "s3": []}
            for i in range(samples):  # interleaved, so drift on the host hits every scenario alike
                runs["floor: import numpy, onnxruntime"].append(spawn(FLOOR, [], base))
                runs["cached"].append(spawn(CHILD, [handler, str(event_file)],
                                            {**base, "MAAS_ARTIFACT_CACHE_DIR": str(cache)}))
                fresh = Path(scratch) / f"empty-{i}"
                runs["s3"].append(spawn(CHILD, [handler, str(event_file)],
                                        {**base, "MAAS_ARTIFACT_CACHE_DIR": str(fresh)}))
                shutil.rmtree(fresh, ignore_errors=True)
            floor = statistics.median(s["answered"] - s["spawned"] for s in runs["floor: import numpy, onnxruntime"])
            for scenario, items in runs.items():
                match = all(same_outputs(answer_outputs(s["answer"]), want) for s in items if s["answer"] is not None)
                wall = statistics.median(s["answered"] - s["spawned"] for s in items)
                add(scenario, "wall_to_answer", wall, "s", match)
                add(scenario, "import", statistics.median(s["imported"] - s["spawned"] for s in items), "s", match)
                if scenario != "floor: import numpy, onnxruntime":
                    add(scenario, "first_request", statistics.median(s["answered"] - s["imported"] for s in items),
                        "s", match)
                    add(scenario, "x_floor", wall / floor, "x", match)
                    add(scenario, "target_0.3s_met", float(wall <= 0.3), "bool", match)
                add(scenario, "peak_rss", statistics.median(s["rss"] for s in items) / 2**20, "MiB", match)
            api = spawn(API_IMPORT, [str(REPO / "functions" / "api" / "handler.py")], base)
            add("api handler import", "loads_onnxruntime", float(api["onnxruntime"]), "bool", not api["onnxruntime"])
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="an .onnx file; default: a tiny 20-feature model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-bench-models-") as scratch:
        models = models_from_args(options.model, Path(scratch))
        results = run(models, options.quick, options.samples)
    print(f"{'scenario':<34} {'metric':<16} {'value':>9} {'unit':<5} match")
    for r in results:
        value = "nan" if math.isnan(r["value"]) else f"{r['value']:.3f}"
        print(f"{r['scenario']:<34} {r['metric']:<16} {value:>9} {r['unit']:<5} {r['outputs_match']}")


if __name__ == "__main__":
    main()
