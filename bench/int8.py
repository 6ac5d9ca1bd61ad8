"""int8 weight schemes against the float parent, in raw onnxruntime on this CPU (not a test).

For MLPs of growing size and a few batch sizes: p50 per run of the float parent and of each scheme's
int8 derivative (``maas.inference.quantization``: ``s7-per-channel`` and ``u8``, which maas uses, and
onnxruntime's default full-range ``s8``, which saturates on CPUs without VNNI and maas never keeps),
each as a ratio to the parent (``> 1`` is faster), plus what ``maas models optimize`` decides for the
model (the scheme it keeps, or the check that refused it). The CPU's flags are printed first: the ratios
differ between VNNI, AVX2-only and ARM64 CPUs (accuracy does not).

    python -m bench.int8 [--runs 200] [--batches 1,4,64]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from maas.errors import MaasError
from maas.inference.optimize import quantize
from maas.inference.quantization import FULL_RANGE_INT8, SCHEMES, quantize_weights
from maas.inference.validation import inspect_model_bytes
from maas.settings import Limits
from tests.models import mlp_model

SIZES: tuple[tuple[int, ...], ...] = ((4, 16, 3), (64, 256, 10), (128, 512, 512, 16), (256, 1024, 512, 16),
                                      (512, 2048, 2048, 16))


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    present = set(flags.split(":", 1)[1].split())
    return f"{platform.machine()}: " + ", ".join(f"{flag} {'yes' if flag in present else 'no'}" for flag in wanted)


def p50_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    for _ in range(max(runs // 10, 5)):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0


def session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def verdict(parent: bytes) -> str:
    try:
        _, report = quantize(parent, inspect_model_bytes(parent, Limits()))
    except MaasError as refused:
        return f"refused: {refused.extra.get('check', 'nothing to quantize')}"
    return f"keeps {report.scheme} ({report.speedup:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batches", default="1,4,64")
    options = parser.parse_args()
    batches = [int(batch) for batch in options.batches.split(",")]
    schemes = (*SCHEMES, FULL_RANGE_INT8)
    print(f"onnxruntime {ort.__version__}, one thread; {cpu_flags()}")
    print(f"{'model':22} {'bytes':>9} {'batch':>5} {'fp32 ms':>9} " + " ".join(f"{s.name:>15}" for s in schemes)
          + "  maas optimize (batch 4)")
    for dims in SIZES:
        parent = mlp_model(dims=dims)
        derived = {scheme.name: session(quantize_weights(parent, scheme)) for scheme in schemes}
        decision = verdict(parent)
        base = session(parent)
        for batch in batches:
            feed = {"x": np.random.default_rng(0).standard_normal((batch, dims[0])).astype(np.float32)}
            float_ms = p50_ms(base, feed, options.runs)
            ratios = " ".join(f"{float_ms / p50_ms(derived[s.name], feed, options.runs):>14.2f}x" for s in schemes)
            print(f"{'x'.join(map(str, dims)):22} {len(parent):>9} {batch:>5} {float_ms:>9.4f} {ratios}  "
                  f"{decision if batch == batches[0] else ''}", flush=True)


if __name__ == "__main__":
    main()
