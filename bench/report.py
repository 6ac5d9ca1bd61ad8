"""Medians over rounds, ratios to raw onnxruntime and to the two bounds, written as JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RAW = "raw-ort"
BOUNDS = ("bare-asgi", "thin-fastapi")
PEERS = ("kserve", "mlserver")
KEY = ("model", "system", "scenario", "metric")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ModuleNotFoundError:
        ort_version = "-"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort_version,
            "platform": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def medians(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model x system x scenario x metric: the median value, ``rounds``, all outputs matched."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(tuple(result[k] for k in KEY), []).append(result)
    rows = []
    for key, group in groups.items():
        matches = [g.get("outputs_match") for g in group if g.get("outputs_match") is not None]
        rows.append({**dict(zip(KEY, key, strict=True)), "value": statistics.median(g["value"] for g in group),
                     "unit": group[0]["unit"], "rounds": len(group),
                     "outputs_match": all(matches) if matches else None})
    return rows


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``x_raw``: ratio to raw onnxruntime in-process (same metric); ``x_<bound>``: to that bound's same point."""
    index = {tuple(r[k] for k in KEY): r["value"] for r in rows}
    out = []
    for r in rows:
        ratios: dict[str, float | None] = {}
        raw = index.get((r["model"], RAW, "in-process", r["metric"]))
        ratios["x_raw"] = r["value"] / raw if raw and r["metric"] != "errors" else None
        for bound in BOUNDS:
            other = index.get((r["model"], bound, r["scenario"], r["metric"]))
            ratios[f"x_{bound}"] = r["value"] / other if other and r["metric"] != "errors" else None
        # The best peer at the same point: the highest throughput, the lowest latency.
        peers = [v for peer in PEERS if (v := index.get((r["model"], peer, r["scenario"], r["metric"])))]
        best = (max(peers) if r["metric"] == "rps" else min(peers)) if peers else None
        ratios["x_best_peer"] = r["value"] / best if best and r["metric"] != "errors" else None
        out.append({**r, **ratios})
    return out


def _order(r: dict[str, Any]) -> tuple[Any, ...]:
    systems = [RAW, "maas-engine", *BOUNDS, "maas-serve"]
    scenarios = ["in-process", "c1", "c8", "c32", "c1 binary", "c8 binary", "c32 binary"]
    return (r["model"], scenarios.index(r["scenario"]) if r["scenario"] in scenarios else 99, r["scenario"],
            r["metric"], systems.index(r["system"]) if r["system"] in systems else 99, r["system"])


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], note: str = "") -> str:
    lines = [
        f"Run {info['date']} on {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"onnxruntime {info['onnxruntime']}{'; ' + note if note else ''}.",
        "",
        "Medians over rounds. `x raw`: the value over raw `session.run` in-process (same metric); "
        "`x bare` / `x fastapi`: over the bare-ASGI / thin-FastAPI bound at the same point. Throughput: higher "
        "is better; latency (ms): lower is better. `x peer`: over the best peer (KServe, MLServer) at the same "
        "point, when peers ran.",
        "",
        "| model | scenario | metric | system | median | unit | x raw | x bare | x fastapi | x peer | outputs match |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=_order):
        match = {True: "yes", False: "**NO**", None: "—"}[r["outputs_match"]]
        lines.append(f"| {r['model']} | {r['scenario']} | {r['metric']} | {r['system']} | {_fmt(r['value'])} | "
                     f"{r['unit']} | {_fmt(r.get('x_raw'))} | {_fmt(r.get('x_bare-asgi'))} | "
                     f"{_fmt(r.get('x_thin-fastapi'))} | {_fmt(r.get('x_best_peer'))} | {match} |")
    return "\n".join(lines) + "\n"


def write(results: list[dict[str, Any]], out: Path, note: str = "") -> tuple[Path, Path]:
    """``latest.json`` (machine, medians with ratios, every raw result) and ``latest.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    rows = with_ratios(medians(results))
    json_path, md_path = out / "latest.json", out / "latest.md"
    json_path.write_text(json.dumps({"machine": info, "note": note, "medians": rows, "results": results}, indent=1))
    md_path.write_text(markdown(rows, info, note))
    return json_path, md_path
