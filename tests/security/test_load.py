"""Load (issue 5, class 10): a real `maas serve` on 127.0.0.1 under a bounded load of mixed traffic
(concurrency 32: mostly inference on a deployed model, some management reads and writes) while a
canary deploy of a new version, a rollback and an all_at_once deploy run. Proves: zero failed
inference requests (every answer is a 200 computed by the version it names), zero lost writes (every
acknowledged write is there afterwards), and server memory flat after warm-up (RSS printed).

``MAAS_LOAD_SECONDS`` (default 30) sets the duration; ``MAAS_LOAD_CONCURRENCY`` (default 32) the workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server, stop_server
from tests.models import scale_model

pytestmark = pytest.mark.e2e

DURATION_S = float(os.environ.get("MAAS_LOAD_SECONDS", "30"))
CONCURRENCY = int(os.environ.get("MAAS_LOAD_CONCURRENCY", "32"))
REQUEST_TIMEOUT_S = 30.0
#: Growth of the server's resident memory allowed over the run, after warm-up. The model is tiny: what
#: grows is Python's heap (request objects, metric series for the models written); a leak of even a few
#: KiB per request (tens of thousands of requests) would cross it.
MAX_RSS_GROWTH_BYTES = 48 * 1024 * 1024
MODEL = "load"
FACTORS = {1: 1.0, 2: 2.0}  # version -> y = x * factor: each answer says which version computed it
TOKEN = "maas_" + "l" * 40


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is optional
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the server") from None
    return int(psutil.Process(pid).memory_info().rss)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("load")
    server = start_server(root / "home", root / "server.log", {"MAAS_ADMIN_TOKEN": TOKEN})
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            assert http.post("/models", json={"name": MODEL}).status_code == 201
            for number, factor in FACTORS.items():
                data = scale_model(factor)
                plan = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                target = http.post(f"/models/{MODEL}/versions", json=plan).json()
                assert target["version"]["version"] == number
                put = http.put(target["upload"]["url"], content=data,
                               headers={"Content-Type": "application/octet-stream"})
                assert put.status_code == 200, put.text
                committed = http.post(f"/models/{MODEL}/versions/{number}/commit", json=plan)
                assert committed.status_code == 200 and committed.json()["status"] == "READY", committed.text
            deployed = http.post(f"/models/{MODEL}/deployments", json={"version": 1})
            assert deployed.status_code == 201, deployed.text
        yield server
    finally:
        stop_server(server)


@dataclass
class Tally:
    inferences: Counter[int] = field(default_factory=Counter)  # answered version -> count
    inference_failures: list[str] = field(default_factory=list)
    reads: int = 0
    management_failures: list[str] = field(default_factory=list)
    models_written: list[str] = field(default_factory=list)  # acknowledged creates
    aliases_written: dict[str, int] = field(default_factory=dict)  # alias -> last acknowledged version
    deploy_log: list[str] = field(default_factory=list)


def infer_body(rng: random.Random) -> tuple[dict[str, Any], list[float]]:
    x = [float(rng.randint(-100, 100)) for _ in range(4)]
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}, x


async def infer(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body, x = infer_body(rng)
    try:
        answer = await http.post(f"/v2/models/{MODEL}/infer", json=body)
    except httpx.HTTPError as error:
        tally.inference_failures.append(f"{type(error).__name__}: {error}")
        return
    if answer.status_code != 200:
        tally.inference_failures.append(f"{answer.status_code} {answer.text[:200]}")
        return
    payload = answer.json()
    version = int(payload["model_version"])
    expected = [value * FACTORS[version] for value in x]
    if payload["outputs"][0]["data"] != expected or answer.headers.get("X-Maas-Model-Version") != str(version):
        tally.inference_failures.append(f"v{version} answered {payload['outputs'][0]['data']} for {x}")
        return
    tally.inferences[version] += 1


async def manage(http: httpx.AsyncClient, rng: random.Random, worker: int, tally: Tally, serial: int) -> None:
    roll = rng.random()
    try:
        if roll < 0.5:  # reads
            path = rng.choice([f"/models/{MODEL}", f"/models/{MODEL}/versions", f"/models/{MODEL}/deployments",
                               f"/models/{MODEL}/aliases", "/models?limit=20", f"/v2/models/{MODEL}"])
            answer = await http.get(path)
            ok = answer.status_code == 200
            tally.reads += ok
        elif roll < 0.75:  # a new model
            name = f"w{worker}-{serial}"
            answer = await http.post("/models", json={"name": name, "tags": {"worker": str(worker)}})
            ok = answer.status_code == 201
            if ok:
                tally.models_written.append(name)
        else:  # move this worker's alias
            alias, version = f"a{worker}", rng.choice(list(FACTORS))
            answer = await http.put(f"/models/{MODEL}/aliases/{alias}", json={"version": version})
            ok = answer.status_code == 200
            if ok:
                tally.aliases_written[alias] = version
    except httpx.HTTPError as error:
        tally.management_failures.append(f"{type(error).__name__}: {error}")
        return
    if not ok:
        tally.management_failures.append(f"{answer.request.method} {answer.request.url.path}: "
                                         f"{answer.status_code} {answer.text[:200]}")


async def worker_loop(http: httpx.AsyncClient, worker: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(worker)
    serial = 0
    while time.monotonic() < deadline:  # bounded: every request has a timeout
        if rng.random() < 0.85:
            await infer(http, rng, tally)
        else:
            serial += 1
            await manage(http, rng, worker, tally, serial)


async def wait_final(http: httpx.AsyncClient, deployment_id: str, limit_s: float) -> str:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = str((await http.get(f"/deployments/{deployment_id}")).json()["status"])
        if status != "IN_PROGRESS":
            return status
        await asyncio.sleep(0.25)
    return "IN_PROGRESS"


async def switches(http: httpx.AsyncClient, start: float, tally: Tally) -> None:
    """Canary deploy of v2 (50 %, baked), rollback to v1, then all_at_once v2, spread over the run."""
    log = tally.deploy_log
    bake = max(1, int(DURATION_S * 0.2))
    await asyncio.sleep(max(0.0, start + DURATION_S * 0.1 - time.monotonic()))
    canary = await http.post(f"/models/{MODEL}/deployments", json={
        "version": 2, "strategy": "canary", "canary_percent": 50, "bake_seconds": bake,
        # latency under a saturating load says nothing about the version: judge it on errors only
        "thresholds": {"max_error_rate": 0.0, "max_p99_latency_ratio": 1000}})
    log.append(f"canary: {canary.status_code}")
    assert canary.status_code == 202, canary.text
    log.append(f"canary final: {await wait_final(http, canary.json()['id'], DURATION_S)}")
    await asyncio.sleep(max(0.0, start + DURATION_S * 0.55 - time.monotonic()))
    rollback = await http.post(f"/models/{MODEL}/rollback", json={})
    log.append(f"rollback: {rollback.status_code} -> v{rollback.json().get('stable_version')}")
    await asyncio.sleep(max(0.0, start + DURATION_S * 0.75 - time.monotonic()))
    again = await http.post(f"/models/{MODEL}/deployments", json={"version": 2, "strategy": "all_at_once"})
    log.append(f"all_at_once: {again.status_code} {again.json().get('status')}")


async def run_load(server: Server, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY + 4, max_keepalive_connections=CONCURRENCY + 4)
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        start = time.monotonic()
        deadline = start + DURATION_S
        workers = [worker_loop(http, worker, deadline, tally) for worker in range(CONCURRENCY)]
        await asyncio.wait_for(asyncio.gather(switches(http, start, tally), *workers),
                               timeout=DURATION_S + 4 * REQUEST_TIMEOUT_S)


async def warm_up(server: Server, tally: Tally, seconds: float) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                 timeout=REQUEST_TIMEOUT_S) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(worker_loop(http, 1000 + w, deadline, tally) for w in range(CONCURRENCY)))


def test_mixed_load_during_deploy_and_rollback(loaded: Server) -> None:
    warm = Tally()
    asyncio.run(warm_up(loaded, warm, min(5.0, DURATION_S / 4)))  # sessions, pools, caches, allocator
    assert warm.inference_failures == [] and sum(warm.inferences.values()) > 0
    before = rss_bytes(loaded.process.pid)

    tally = Tally()
    started = time.monotonic()
    asyncio.run(run_load(loaded, tally))
    elapsed = time.monotonic() - started
    after = rss_bytes(loaded.process.pid)

    total = sum(tally.inferences.values())
    writes = len(tally.models_written) + len(tally.aliases_written)
    print(f"\nload: {elapsed:.1f} s, concurrency {CONCURRENCY}: {total} inferences "
          f"({total / elapsed:.0f}/s, by version {dict(tally.inferences)}), {tally.reads} reads, "
          f"{len(tally.models_written)} models created, {len(tally.aliases_written)} aliases moved; "
          f"deploys: {'; '.join(tally.deploy_log)}")
    print(f"server RSS before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB, "
          f"growth {(after - before) / 2**20:+.1f} MiB (bound {MAX_RSS_GROWTH_BYTES / 2**20:.0f} MiB)")

    assert tally.inference_failures == [], tally.inference_failures[:10]
    assert tally.management_failures == [], tally.management_failures[:10]
    assert "canary final: SUCCEEDED" in tally.deploy_log, tally.deploy_log
    assert tally.deploy_log[-1].startswith("all_at_once: 201"), tally.deploy_log
    assert set(tally.inferences) == {1, 2}, "both versions served: the switches happened under load"
    assert total > 100 and writes > 0

    with httpx.Client(base_url=loaded.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
        for name in tally.models_written:  # zero lost writes
            assert http.get(f"/models/{name}").status_code == 200, name
        for alias, version in tally.aliases_written.items():
            assert http.get(f"/models/{MODEL}/aliases/{alias}").json()["version"] == version, alias
    assert after - before < MAX_RSS_GROWTH_BYTES, f"RSS grew {(after - before) / 2**20:.1f} MiB"
