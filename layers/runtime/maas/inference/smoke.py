"""The deploy workflow's smoke test: run a version on inputs made from its signature, in the sandbox,
before any traffic reaches it.

Inputs: every dynamic dimension is 1, dtypes are the signature's, values are deterministic and mild
(floats in (0, 1], integers 0 and 1, booleans alternating, strings "maas"), run in the sandbox's child
(then loaded, sha256-verified, by ``engine.warm``, without running it), so a model that cannot
answer them, answers NaN or Inf, or answers outputs whose rank or fixed dimensions differ from its
signature is rejected (``Unhealthy``, which rolls the deploy back) with a detail that says which output
and how."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from maas.domain import ModelVersion, Signature, TensorSpec
from maas.errors import Unhealthy
from maas.inference.checks import session_signature
from maas.inference.codec import datatype_to_dtype
from maas.inference.engine import InferenceEngine, _clean_message

if TYPE_CHECKING:
    from maas.inference.sandbox import Sandbox

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


def check_outputs(signature: Signature, names: list[str], results: list[Any], what: str) -> None:
    """``Unhealthy`` when an output is missing, has the wrong rank or fixed dimensions, or holds NaN/Inf."""
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


def _run(session: Any, signature: Signature, what: str) -> None:
    names = [spec.name for spec in signature.outputs]
    try:
        results = session.run(names, smoke_inputs(signature))
    except Exception as error:
        raise Unhealthy(f"{what} could not run on inputs made from its signature: "
                        f"{_clean_message(error)}") from None
    check_outputs(signature, names, results, what)


def run_smoke_test(data: bytes, signature: Signature, what: str) -> None:
    """The smoke test on a model's bytes in this process, with the engine's session options (what the
    sandbox child runs: its rlimits and timeout are the bounds)."""
    import onnxruntime as ort

    from maas.inference.engine import default_session_options

    options = default_session_options()
    options.intra_op_num_threads = 1  # the child may start only a few threads (RLIMIT_NPROC)
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise Unhealthy(f"{what}: the model could not be loaded: {_clean_message(error)}") from None
    _run(session, signature, what)


class SmokeTest:
    """``maas.services.deploy.SmokeTest``: ``SmokeTest(engine, sandbox)(version)``.

    With a sandbox (what the servers and the deploy function use) the run happens in its child, then
    the engine loads the version without running it: a model whose smoke inputs set off an allocation
    or a loop spends the child's memory and time, not the server's (it once took +2 GB and a busy
    thread for 7 s inside the server). Without one (tests with an in-process validator) the engine's
    own session runs the inputs."""

    def __init__(self, engine: InferenceEngine, sandbox: Sandbox | None = None):
        self.engine = engine
        self.sandbox = sandbox

    def __call__(self, version: ModelVersion) -> None:
        what = f"the smoke test of model {version.model!r} version {version.version}"
        if self.sandbox is not None:
            data = self.engine.artifact(version)  # sha256 verified: StorageCorrupted as is
            signature = version.signature or self._signature(version)
            self.sandbox.smoke_test(data, signature, what)
            self.engine.warm(version)
            return
        self.engine.warm(version)  # loads (sha256 verified): StorageCorrupted / InferenceFailed as is
        # The engine's own session (the one that will serve), run directly: the smoke run is not a
        # client request, so it stays out of the version's metrics (and out of its health window).
        _run(self.engine.session(version), version.signature or self._signature(version), what)

    def _signature(self, version: ModelVersion) -> Signature:
        """A version recorded without a signature: the session's own (as the engine checks it)."""
        return session_signature(self.engine.session(version))


__all__ = ["SmokeTest", "check_outputs", "run_smoke_test", "smoke_inputs"]
