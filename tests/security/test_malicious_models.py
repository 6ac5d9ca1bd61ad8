"""Malicious models (issue 5, item 5): every file of the corpus built by
``scripts/make_malicious_corpus.py`` is rejected with a clean reason, or (harmless mutations and
polyglots only) validated cleanly, within bounded time and memory, and nothing it carries ever runs.

The corpus holds ~10,100 files, ~10,000 of them mutations, so the work is split by cost (the whole
module must stay well under 90 s on a 2-core CI machine):

1. every file goes through ``check_static`` in this process: the content, protobuf, structure,
   checker and signature stages that the validation child runs first (no onnxruntime), ~0.3 ms each;
2. the files that pass it (valid-looking mutations, polyglots, run-time bombs) get their full
   verdict (smoke inference in onnxruntime) in one child process under the validator's own rlimits,
   streaming one verdict per file; if onnxruntime ever kills that child, the file it died on goes
   through ``SubprocessValidator`` (which must turn the crash into a rejection) and the batch resumes;
3. a sample (each attack class, files that cannot be uploaded, a few mutations) goes through the
   real ``SubprocessValidator`` and through the HTTP push + commit path of the local server, which
   must keep answering and keep the store's invariants.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.backends.local import LocalBackend
from maas.domain import Signature
from maas.errors import ModelRejected
from maas.examples import example_model_path
from maas.inference.sandbox import SubprocessValidator, child_rlimits
from maas.inference.signature import ONNX_TO_OIP
from maas.inference.validation import check_static, read_bounded
from maas.services.invariants import check_invariants
from maas.settings import Limits, Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_malicious_corpus.py"
LIMITS = Limits()
#: The classes the corpus must hold (issue 5, item 5), each with at least one file.
REQUIRED_KINDS = frozenset({
    "pickle", "torch-zip", "yaml", "zip-slip", "zip-bomb", "tar", "tar-bomb", "gzip-bomb", "external-data",
    "protobuf", "custom-domain", "huge-dims", "runtime-bomb", "polyglot", "mutation",
})
#: Wall-clock bound of one in-process static verdict (the node-count bombs take ~1 s on a loaded
#: 2-core machine; everything else takes well under 10 ms).
STATIC_SECONDS = 5.0
#: Wall-clock bound of one verdict inside the batch child (smoke inference of a small model).
BATCH_SECONDS = 10.0
#: Wall-clock bound of the whole batch child (~2,000 smoke inferences, ~15 s on a loaded 2-core machine).
BATCH_TIMEOUT_S = 120
#: How much this process's peak RSS may grow while it judges the whole corpus: bombs are never
#: inflated and node-count bombs are capped, so the parse of the largest file (2 MB) is the peak.
STATIC_RSS_GROWTH_BYTES = 512 * 1024 * 1024
#: Where zip-slip and tar members aim: nothing may ever create them.
SLIP_TARGETS = (Path("/tmp/evil.sh"), Path("/etc/cron.d/evil"))


def load_script() -> ModuleType:
    """``scripts/`` is not a package: load the corpus builder from its file (registered in
    sys.modules first, which its dataclasses need)."""
    name = "make_malicious_corpus"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Corpus:
    root: Path
    manifest: dict[str, Any]  # relative path -> make_malicious_corpus.Entry
    marker: Path

    def path(self, relative: str) -> Path:
        return self.root / relative

    def files(self) -> dict[str, str]:
        """Relative path -> sha256 of every regular file under the root (symlinks by target)."""
        state: dict[str, str] = {}
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = Path(directory) / name
                key = str(path.relative_to(self.root))
                if path.is_symlink():
                    state[key] = f"-> {os.readlink(path)}"
                elif path.stat().st_size < 16 * 1024 * 1024:  # the sparse over-cap file is left out
                    state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return state


@dataclass(frozen=True)
class Outcome:
    """One verdict: the signature, or the rejection reason; how long it took."""

    signature: Signature | None
    reason: str | None
    seconds: float


@dataclass(frozen=True)
class StaticRun:
    """Stage 1 over the whole corpus: each file's outcome, and how much this process's peak RSS grew."""

    outcomes: dict[str, Outcome]
    rss_growth: int


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("malicious-corpus")
    marker = root / "PWNED"
    manifest = load_script().build_corpus(root, seed=5, marker=marker)
    return Corpus(root, manifest, marker)


@pytest.fixture(scope="module")
def corpus_before(corpus: Corpus) -> dict[str, str]:
    """The corpus as built: the tests prove validating it changed nothing in it."""
    return corpus.files()


@pytest.fixture(scope="module")
def static_run(corpus: Corpus, corpus_before: dict[str, str]) -> StaticRun:
    """Stage 1: ``check_static`` in this process for every file; anything but a Signature or a
    ModelRejected propagates (and fails every test that uses this fixture)."""
    outcomes: dict[str, Outcome] = {}
    rss_before = _peak_rss()
    for relative in sorted(corpus.manifest):
        limits = Limits(**corpus.manifest[relative].limits)
        path = corpus.path(relative)
        started = time.perf_counter()
        try:
            signature: Signature | None = check_static(read_bounded(path, limits), limits)
            reason = None
        except ModelRejected as rejection:
            signature, reason = None, rejection.detail
        outcomes[relative] = Outcome(signature, reason, time.perf_counter() - started)
    return StaticRun(outcomes, _peak_rss() - rss_before)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def assert_clean_reason(reason: str, corpus: Corpus) -> None:
    """What users see: one short line, no traceback, no filesystem path of the server."""
    assert reason
    assert "\n" not in reason
    assert len(reason) <= 300
    assert "Traceback" not in reason
    assert str(corpus.root) not in reason
    assert "/tmp/" not in reason and "/etc/" not in reason and "site-packages" not in reason


def assert_expected(relative: str, entry: Any, outcome: Outcome, corpus: Corpus) -> None:
    if outcome.reason is not None:
        assert_clean_reason(outcome.reason, corpus)
        if entry.reason is not None:
            assert entry.reason in outcome.reason.lower(), (relative, outcome.reason)
        return
    assert entry.verdict == "either", f"{relative} ({entry.kind}) was accepted"
    assert outcome.signature is not None
    for spec in (*outcome.signature.inputs, *outcome.signature.outputs):
        assert spec.datatype in ONNX_TO_OIP.values()


# ------------------------------------------------------------------------------------------------
# the corpus itself


def test_corpus_has_every_class_and_ten_thousand_mutations(corpus: Corpus) -> None:
    kinds = {entry.kind for entry in corpus.manifest.values()}
    assert kinds >= REQUIRED_KINDS
    counts = {kind: sum(entry.kind == kind for entry in corpus.manifest.values()) for kind in kinds}
    assert counts["mutation"] >= 10_000
    for relative in corpus.manifest:
        assert corpus.path(relative).is_file(), relative
    written = json.loads((corpus.root / "manifest.json").read_text())
    assert set(written) == set(corpus.manifest)
    # every traversal variant the issue names is there
    locations = set(load_script().EXTERNAL_LOCATIONS.values())
    assert {"../x", "/etc/passwd", "subdir/../../x", "..\\x", "C:\\x", "%2e%2e%2fx"} <= locations
    assert any("\x00" in location for location in locations)
    assert corpus.path("external-data/symlink-file/weights.bin").is_symlink()


def test_corpus_is_deterministic_and_the_script_has_a_cli(corpus: Corpus, tmp_path: Path) -> None:
    script = load_script()
    bases = script.base_models()
    first = list(script.mutations(bases, 300, 5))
    assert first == list(script.mutations(bases, 300, 5))
    assert first != list(script.mutations(bases, 300, 6))
    rebuilt = [data for _, data in first]
    on_disk = [corpus.path(relative).read_bytes() for relative in sorted(
        r for r, e in corpus.manifest.items() if e.kind == "mutation")[:300]]
    assert rebuilt == on_disk
    helped = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--mutations" in helped.stdout and "--seed" in helped.stdout
    built = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "small"), "--mutations", "20"],
                           capture_output=True, text=True, check=True)
    assert "mutation" in built.stdout
    assert len(json.loads((tmp_path / "small" / "manifest.json").read_text())) == len(corpus.manifest) - 10_000 + 20


# ------------------------------------------------------------------------------------------------
# stage 1: every file, in-process static checks


def test_every_file_gets_a_static_verdict_quickly(corpus: Corpus, static_run: StaticRun) -> None:
    """All ~10,100 files through the static stage: a Signature or a clean ModelRejected for each
    (the fixture lets any other exception through), every malicious file refused for the expected
    reason unless it is a run-time bomb, bounded time per file and bounded memory overall."""
    outcomes = static_run.outcomes
    assert set(outcomes) == set(corpus.manifest)
    for relative, outcome in outcomes.items():
        entry = corpus.manifest[relative]
        assert outcome.seconds < STATIC_SECONDS, (relative, outcome.seconds)
        if entry.runtime:
            assert outcome.signature is not None, f"{relative}: the run-time bomb should pass the static stage"
            continue
        assert_expected(relative, entry, outcome, corpus)
    rejected = sum(o.reason is not None for o in outcomes.values())
    assert rejected > len(outcomes) // 2  # most random mutations break the model
    assert static_run.rss_growth < STATIC_RSS_GROWTH_BYTES
    assert not corpus.marker.exists()


# ------------------------------------------------------------------------------------------------
# stage 2: full verdicts for what passed the static checks, in one sandboxed child


_BATCH_WORKER = r"""
import json, resource, sys, time
from maas.inference.validate_worker import apply_rlimits
config = json.loads(sys.argv[1])
apply_rlimits(config["rlimits"])
from pathlib import Path
from maas.errors import ModelRejected
from maas.inference.validation import inspect_model_file
from maas.settings import Limits
limits = Limits.model_validate(config["limits"])
for line in sys.stdin:
    path = line.rstrip("\n")
    started = time.perf_counter()
    try:
        answer = {"signature": inspect_model_file(Path(path), limits).model_dump(mode="json")}
    except ModelRejected as exc:
        answer = {"reason": exc.detail}
    except MemoryError:
        answer = {"reason": "validation process exceeded its memory limit"}
    answer.update(path=path, seconds=time.perf_counter() - started,
                  rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


def run_batch(paths: list[Path], limits: Limits, workdir: Path) -> list[dict[str, Any]]:
    """Full verdicts for ``paths`` from one child under ``child_rlimits`` (the validator's own), in
    order; stops early (returning fewer answers) if the child dies."""
    config = json.dumps({"limits": limits.model_dump(mode="json"), "rlimits": child_rlimits(limits)})
    env = {key: os.environ[key] for key in ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH") if key in os.environ}
    env.update(HOME=str(workdir), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        result = subprocess.run([sys.executable, "-P", "-c", _BATCH_WORKER, config],
                                input="".join(f"{p}\n" for p in paths), capture_output=True, text=True,
                                timeout=BATCH_TIMEOUT_S, env=env, cwd=workdir, check=False)
    except subprocess.TimeoutExpired as expired:  # stuck on one file: judged like a crash on it
        partial = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return [json.loads(line) for line in partial.split("\n")[:-1] if line.strip()]  # complete lines only
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if len(answers) == len(paths):
        assert result.returncode == 0, result.stderr[-2000:]
    return answers


def test_files_that_pass_the_static_checks_get_a_sandboxed_verdict(corpus: Corpus, static_run: StaticRun,
                                                                    tmp_path: Path) -> None:
    """Everything that looks like a valid model is run (smoke inference) under the child's rlimits:
    accepted with the signature the static stage read, or rejected cleanly; the memory bomb is
    rejected for memory. A file that kills the child is re-judged by SubprocessValidator."""
    outcomes = static_run.outcomes
    passers = [r for r, o in outcomes.items() if o.signature is not None and not corpus.manifest[r].limits]
    assert len(passers) > 100  # plenty of mutations keep the model valid: the smoke run matters
    memory_limit = child_rlimits(LIMITS)["RLIMIT_AS"]
    verdicts: dict[str, Outcome] = {}
    crashed: list[str] = []
    remaining = list(passers)
    while remaining:
        answers = run_batch([corpus.path(r) for r in remaining], LIMITS, tmp_path)
        for relative, answer in zip(remaining, answers, strict=False):
            assert answer["path"] == str(corpus.path(relative))
            signature = Signature.model_validate(answer["signature"]) if "signature" in answer else None
            verdicts[relative] = Outcome(signature, answer.get("reason"), answer["seconds"])
            assert answer["rss"] <= memory_limit
        if len(answers) < len(remaining):  # the child died on the next file: the real sandbox judges it
            relative = remaining[len(answers)]
            crashed.append(relative)
            with pytest.raises(ModelRejected) as rejection:
                SubprocessValidator(LIMITS).validate(corpus.path(relative))
            verdicts[relative] = Outcome(None, rejection.value.detail, 0.0)
        remaining = remaining[len(answers) + 1:]
    assert set(verdicts) == set(passers)
    for relative, verdict in verdicts.items():
        entry = corpus.manifest[relative]
        assert verdict.seconds < BATCH_SECONDS, (relative, verdict.seconds)
        assert_expected(relative, entry, verdict, corpus)
        if verdict.signature is not None:
            assert verdict.signature == outcomes[relative].signature
    assert "memory" in (verdicts["runtime-bomb/memory.onnx"].reason or "")
    accepted = sum(v.signature is not None for v in verdicts.values())
    assert accepted > 0  # harmless mutations (e.g. flipped weight bytes) still validate
    print(f"\nsandboxed batch: {len(verdicts)} verdicts, {accepted} accepted, child crashes on: {crashed}")
    assert not corpus.marker.exists()


# ------------------------------------------------------------------------------------------------
# stage 3: a sample through the real sandbox and the HTTP API


def http_sample(corpus: Corpus, outcomes: dict[str, Outcome]) -> list[str]:
    """The first uploadable file of each class, external data hidden deep in subgraphs, the memory
    bomb, and four mutations (two the static stage accepts, two it rejects): the files pushed
    through the API and the sandbox (each push costs a child process, ~0.5 s)."""
    chosen: list[str] = []
    for kind in sorted({entry.kind for entry in corpus.manifest.values()} - {"mutation"}):
        first = next((r for r, e in sorted(corpus.manifest.items()) if e.kind == kind and e.http and not e.limits),
                     None)
        if first is not None:
            chosen.append(first)
    chosen += ["external-data/placement/nested-subgraph.onnx", "runtime-bomb/memory.onnx"]
    mutations = sorted(r for r, e in corpus.manifest.items() if e.kind == "mutation")
    chosen += [r for r in mutations if outcomes[r].signature is not None][:2]
    chosen += [r for r in mutations if outcomes[r].signature is None][:2]
    return sorted(set(chosen))


def test_files_that_cannot_be_uploaded_are_rejected_by_the_sandboxed_validator(corpus: Corpus) -> None:
    """Symlinks next to the model and a file over the size cap exist only on disk (an upload is one
    regular file): the child process must refuse them without following or reading them."""
    secret = corpus.path("outside/secret.bin")
    before = secret.stat()
    validator = SubprocessValidator(LIMITS)
    local = sorted(r for r, e in corpus.manifest.items() if not e.http)
    assert len(local) >= 3
    for relative in local:
        started = time.perf_counter()
        with pytest.raises(ModelRejected) as rejection:
            validator.validate(corpus.path(relative))
        assert time.perf_counter() - started < LIMITS.validation_timeout_s
        reason = rejection.value.detail
        assert_clean_reason(reason, corpus)
        assert corpus.manifest[relative].reason in reason.lower(), (relative, reason)
    assert secret.stat().st_mtime_ns == before.st_mtime_ns and secret.read_bytes() == b"\x00\x00\x80?\x00\x00\x00@"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[TestClient, LocalBackend]]:
    """The local server app over a fresh store, validating uploads with the real sandboxed child
    (``LocalBackend``'s default validator)."""
    settings = Settings(home=tmp_path / "home", limits=Limits(validation_timeout_s=60))
    backend = LocalBackend(settings)
    assert isinstance(backend.validator, SubprocessValidator)
    token, _ = backend.ensure_admin_token(None)
    try:
        with TestClient(create_app(backend, settings), base_url="http://127.0.0.1") as client:
            client.headers["Authorization"] = f"Bearer {token}"
            yield client, backend
    finally:
        backend.close()


def push(client: TestClient, name: str, data: bytes) -> tuple[int, dict[str, Any]]:
    """Reserve, upload and commit one version; the commit's status code and body."""
    digest = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reserved = client.post(f"/models/{name}/versions", json=digest)
    assert reserved.status_code == 201, reserved.text
    upload, version = reserved.json()["upload"], reserved.json()["version"]["version"]
    uploaded = client.put(f"/uploads/{upload['upload_id']}", content=data,
                          headers={"Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 200, uploaded.text
    committed = client.post(f"/models/{name}/versions/{version}/commit", json=digest)
    return committed.status_code, committed.json() | {"version_number": version}


def test_sample_through_the_http_api_and_the_sandbox(corpus: Corpus, corpus_before: dict[str, str],
                                                      static_run: StaticRun,
                                                      server: tuple[TestClient, LocalBackend]) -> None:
    """Each class (and four mutations) pushed and committed through the API of the local server with
    the real sandboxed validator: a 422 problem with a clean reason and a FAILED version, or a READY
    version; the server answers health checks after each; the store's invariants hold at the end."""
    client, backend = server
    outcomes = static_run.outcomes
    assert client.post("/models", json={"name": "evil"}).status_code == 201
    chosen = http_sample(corpus, outcomes)
    assert len(chosen) >= 18
    for relative in chosen:
        entry = corpus.manifest[relative]
        started = time.perf_counter()
        status, body = push(client, "evil", corpus.path(relative).read_bytes())
        assert time.perf_counter() - started < LIMITS.validation_timeout_s
        version = client.get(f"/models/evil/versions/{body['version_number']}").json()
        if status == 422:
            assert body["status"] == 422 and set(body) >= {"type", "title", "detail"}
            assert_clean_reason(body["detail"], corpus)
            if entry.reason is not None:
                assert entry.reason in body["detail"].lower(), (relative, body["detail"])
            assert version["status"] == "FAILED" and version["status_reason"] == body["detail"]
        else:
            assert status == 200, (relative, status, body)
            assert entry.verdict == "either", f"{relative} ({entry.kind}) was accepted"
            assert version["status"] == "READY"
            assert Signature.model_validate(version["signature"]) == outcomes[relative].signature
        live = client.get("/v2/health/live")
        assert live.status_code == 200, relative
    assert check_invariants(backend.registry, backend.artifacts) == []
    assert not corpus.marker.exists()
    assert not any(target.exists() for target in SLIP_TARGETS)
    assert corpus.files() == corpus_before  # nothing was extracted, written or followed into the corpus


# ------------------------------------------------------------------------------------------------
# the child's resource limits


def test_the_child_runs_under_every_resource_limit() -> None:
    """Memory, CPU, file size, open files and (where /proc tells the user's task count) processes,
    all bounded, and a real model still validates under them."""
    rlimits = child_rlimits(LIMITS)
    assert rlimits["RLIMIT_AS"] == LIMITS.validation_memory_bytes
    assert rlimits["RLIMIT_CPU"] == math.ceil(LIMITS.validation_timeout_s) + 1
    assert rlimits["RLIMIT_FSIZE"] == 0 and rlimits["RLIMIT_CORE"] == 0
    assert rlimits["RLIMIT_NOFILE"] == LIMITS.validation_max_open_files
    if Path("/proc/self/status").exists():
        assert rlimits["RLIMIT_NPROC"] >= LIMITS.validation_max_new_tasks
    tight = Limits(validation_max_open_files=16, validation_max_new_tasks=4)
    assert SubprocessValidator(tight).validate(example_model_path()).inputs[0].name == "features"


def test_a_cpu_bomb_is_rejected_by_the_timeout_not_a_hang(corpus: Corpus) -> None:
    entry = corpus.manifest["runtime-bomb/cpu.onnx"]
    limits = Limits(**entry.limits)
    started = time.perf_counter()
    with pytest.raises(ModelRejected, match="timed out") as rejection:
        SubprocessValidator(limits).validate(corpus.path("runtime-bomb/cpu.onnx"))
    assert time.perf_counter() - started < limits.validation_timeout_s + 5
    assert_clean_reason(rejection.value.detail, corpus)


def test_the_cpu_rlimit_stops_a_child_the_wall_clock_did_not(corpus: Corpus, tmp_path: Path) -> None:
    """RLIMIT_CPU is the backstop when the parent's timeout cannot act (a parent killed or stalled):
    the worker itself, run with a 2 s CPU limit (``validation_timeout_s=1``) and only a distant
    wall-clock guard, dies of SIGXCPU on the CPU bomb, and the validator maps that death to a clean
    rejection."""
    path = corpus.path("runtime-bomb/cpu.onnx")
    limits = Limits(validation_timeout_s=1)
    config = json.dumps({"limits": LIMITS.model_dump(mode="json"), "rlimits": child_rlimits(limits)})
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-P", "-m", "maas.inference.validate_worker", str(path), config],
                            capture_output=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL), result
    assert time.perf_counter() - started < 30
    with pytest.raises(ModelRejected, match=r"CPU time limit|memory limit or crashed") as rejection:
        SubprocessValidator(limits)._verdict(result)
    assert_clean_reason(rejection.value.detail, corpus)
