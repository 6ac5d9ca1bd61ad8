"""The deploy workflow's smoke test: run a version on inputs made from its signature, through the same
``InferenceEngine`` that serves it, before any traffic reaches it.

Inputs: every dynamic dimension is 1, dtypes are the signature's, values are deterministic and mild
(floats in (0, 1], integers 0 and 1, booleans alternating, strings "maas"), run on the session the
engine serves the version with (loaded and sha256-verified by ``engine.warm``), so a model that cannot
answer them, answers NaN or Inf, or answers outputs whose rank or fixed dimensions differ from its
signature is rejected (``Unhealthy``, which rolls the deploy back) with a detail that says which output
and how."""

from __future__ import annotations

from typing import Any

import numpy as np

from maas.domain import ModelVersion, Signature, TensorSpec
from maas.errors import Unhealthy
from maas.inference.codec import datatype_to_dtype
from maas.inference.engine import InferenceEngine, _clean_message, _session_signature

_FLOATS = frozenset({"FP16", "FP32", "FP64"})


def smoke_inputs(signature: Signature) -> dict[str, np.ndarray]:
    """One deterministic input per signature input (dynamic dimensions -> 1)."""
    return {spec.name: _input(spec) for spec in signature.inputs}


def _input(spec: TensorSpec) -> np.ndarray:
    shape = tuple(dim if dim >= 0 else 1 for dim in spec.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = ["maas"] * count  # onnxruntime's string tensors take str
        return array.reshape(shape)
    dtype = datatype_to_dtype(spec.datatype)
    index = np.arange(count)
    if spec.datatype in _FLOATS:
        values: Any = ((index % 8) + 1) / 8.0
    elif spec.datatype == "BOOL":
        values = index % 2 == 0
    else:
        values = index % 2
    return np.asarray(values, dtype=dtype).reshape(shape)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class SmokeTest:
    """``maas.services.deploy.SmokeTest`` with an engine: ``SmokeTest(engine)(version)``."""

    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    def __call__(self, version: ModelVersion) -> None:
        self.engine.warm(version)  # loads (sha256 verified): StorageCorrupted / InferenceFailed as is
        signature = version.signature or self._signature(version)
        what = f"the smoke test of model {version.model!r} version {version.version}"
        # The engine's own session (the one that will serve), run directly: the smoke run is not a
        # client request, so it stays out of the version's metrics (and out of its health window).
        session = self.engine.session(version)
        names = [spec.name for spec in signature.outputs]
        try:
            results = session.run(names, smoke_inputs(signature))
        except Exception as error:
            raise Unhealthy(f"{what} could not run on inputs made from its signature: "
                            f"{_clean_message(error)}") from None
        outputs = dict(zip(names, results, strict=True))
        for spec in signature.outputs:
            array = outputs.get(spec.name)
            if array is None:
                raise Unhealthy(f"{what}: output {spec.name!r} is missing from the answer")
            got = tuple(int(d) for d in np.shape(array))
            if len(got) != len(spec.shape) or any(want >= 0 and want != have for want, have in zip(
                    spec.shape, got, strict=True)):
                raise Unhealthy(f"{what}: output {spec.name!r} has shape {_shape(got)}, its signature says "
                                f"{_shape(spec.shape)} (-1 = any size)")
            if isinstance(array, np.ndarray) and array.dtype.kind in "fc":
                bad = ~np.isfinite(array)
                if bad.any():
                    kinds = " and ".join(name for name, found in (("NaN", np.isnan(array).any()),
                                                                  ("Inf", np.isinf(array).any())) if found)
                    raise Unhealthy(f"{what}: output {spec.name!r} has {kinds} values ({int(bad.sum())} of "
                                    f"{array.size}) on inputs made from its signature")

    def _signature(self, version: ModelVersion) -> Signature:
        """A version recorded without a signature: the session's own (as the engine checks it)."""
        return _session_signature(self.engine.session(version))


__all__ = ["SmokeTest", "smoke_inputs"]
