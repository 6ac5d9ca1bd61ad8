"""What onnxruntime's integer matrix products compute on CPUs other than the one running the tests.

onnx's reference evaluator runs a quantized graph in numpy with exact 32-bit sums: what VNNI CPUs,
ARM64 and the U8U8 kernels compute. ``without_vnni`` swaps in a ``MatMulInteger`` that adds each pair of
adjacent products into a saturating signed 16-bit lane first, as ``VPMADDUBSW`` does on x86 CPUs without
VNNI (AVX2, AVX-512 before Cascade Lake) for uint8 x int8 operands, then corrects for the zero points
in 32 bits as onnxruntime's MLAS does. So a test can see what a model answers on either kind of CPU,
whatever CPU runs the test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

INT16_MIN, INT16_MAX = -32768, 32767


def pair_saturated_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for uint8 ``a`` [M, K] and int8 ``b`` [K, N], each pair of adjacent products along K
    summed and clamped to int16 before the 32-bit accumulation (K padded with a zero to even)."""
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    m, k = a.shape
    pairs = np.einsum("mpi,pin->mpn", a.astype(np.int32).reshape(m, k // 2, 2),
                      b.astype(np.int32).reshape(k // 2, 2, b.shape[1]))
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1).astype(np.int32)


class MatMulInteger(OpRun):  # the class name is the operator it replaces
    op_domain = ""

    def _run(self, a: np.ndarray, b: np.ndarray, a_zero_point: Any = None,  # type: ignore[override]
             b_zero_point: Any = None) -> tuple[np.ndarray]:
        rows = a.reshape(-1, a.shape[-1])
        za = np.int32(0 if a_zero_point is None else np.asarray(a_zero_point).astype(np.int32).reshape(()))
        zb = np.zeros((), np.int32) if b_zero_point is None else np.asarray(b_zero_point).astype(np.int32)
        if a.dtype == np.uint8 and b.dtype == np.int8:
            raw = pair_saturated_products(rows, b)
        else:
            raw = rows.astype(np.int32) @ b.astype(np.int32)
        k = rows.shape[1]
        result = (raw - zb * rows.astype(np.int32).sum(axis=1, keepdims=True)
                  - za * b.astype(np.int32).sum(axis=0) + k * za * zb)
        return (result.reshape(*a.shape[:-1], b.shape[1]).astype(np.int32),)


def exact(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs with exact integer sums (VNNI, ARM64, U8U8)."""
    return list(ReferenceEvaluator(model).run(None, feed))


def without_vnni(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs with ``VPMADDUBSW``'s saturating pair sums (x86 without VNNI)."""
    return list(ReferenceEvaluator(model, new_ops=[MatMulInteger]).run(None, feed))
