"""Faults in random sequences (issue 5, class 9): a Hypothesis state machine drives the local backend
through random operations (create, push, alias, deploy, rollback, delete version / model, cleanup,
restart), each possibly failing at its k-th registry, artifact-store or SQLite call. After every step:
DESIGN.md's invariants hold (``check_invariants``) and every acknowledged write is still there, as a
model of what the client was told says. Derandomized and bounded for CI (about 20 s here).

The AWS backend gets the same faults call by call in test_faults.py; under moto each step costs ~10x
more, so it is left out of the random sequences."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from maas.domain import VersionStatus
from maas.errors import Conflict, MaasError, NotFound
from maas.services.cleanup import CleanupService
from maas.services.invariants import check_invariants
from tests.models import scale_model
from tests.security.test_faults import (
    LATER,
    Counter,
    FaultyPort,
    InjectedFault,
    World,
    local_backend,
    push,
    sqlite_faults,
)

NAMES = ("a", "b")
ALIASES = ("champion", "stable")
FACTORS = (1.0, 2.0, 3.0, 4.0)
STATS = {"sequences": 0, "steps": 0, "acknowledged": 0, "faults fired": 0}
FAULTS = st.none() | st.tuples(st.sampled_from(["registry", "artifacts", "sqlite"]), st.integers(1, 12))


class FaultySequences(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="maas-sequences-"))
        self.counters = {"registry": Counter(), "artifacts": Counter(), "sqlite": Counter(error=_disk_error)}
        for counter in self.counters.values():
            counter.armed = False
        # What the client was told (acknowledged), and what may or may not have happened (a failed call).
        self.models: set[str] = set()  # acknowledged to exist (no delete attempted since)
        self.versions: dict[tuple[str, int], str] = {}  # acknowledged READY -> sha256
        self.aliases: dict[tuple[str, str], set[int]] = {}  # the versions the alias may point at
        self.serving: dict[str, set[int | None]] = {}  # the stable versions the route may have
        self.faults_fired = 0
        self._open()

    # --- plumbing ---------------------------------------------------------------------------------
    def _open(self) -> None:
        with sqlite_faults(self.counters["sqlite"]):  # this thread's connection fails when armed
            self.backend = local_backend(self.root / "home")
        self.world = World(self.backend, FaultyPort(self.backend.registry, self.counters["registry"]),
                           FaultyPort(self.backend.artifacts, self.counters["artifacts"]))
        self.sound = World(self.backend, self.backend.registry, self.backend.artifacts)

    def _attempt(self, fault: tuple[str, int] | None, action: Any) -> tuple[bool, Any, bool]:
        """Run ``action(world)`` with the fault armed: (acknowledged, result or error, the fault fired).
        A call that failed without the fault firing was refused, and must have changed nothing."""
        counter = self.counters[fault[0]] if fault else None
        if counter is not None:
            counter.calls, counter.fail_at, counter.armed = 0, fault[1], True  # type: ignore[index]
        try:
            result = action(self.world)
            STATS["acknowledged"] += 1
            return True, result, False
        except (InjectedFault, MaasError, sqlite3.Error, OSError) as error:
            return False, error, self._fired(counter)
        finally:
            self.faults_fired += self._fired(counter)
            if counter is not None:
                counter.armed = False

    @staticmethod
    def _fired(counter: Counter | None) -> bool:
        return counter is not None and counter.calls >= counter.fail_at  # type: ignore[operator]

    def teardown(self) -> None:
        STATS["sequences"] += 1
        STATS["faults fired"] += self.faults_fired
        self.backend.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- rules ------------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.sound.models.create_model("a")
        self.models.add("a")
        self.serving["a"] = {None}

    @rule(name=st.sampled_from(NAMES), fault=FAULTS)
    def create_model(self, name: str, fault: tuple[str, int] | None) -> None:
        ok, result, fired = self._attempt(fault, lambda w: w.models.create_model(name))
        if ok:
            self.models.add(name)
            self.serving.setdefault(name, {None})
        elif not fired:
            assert isinstance(result, Conflict) and self._exists(name), result

    @rule(name=st.sampled_from(NAMES), factor=st.sampled_from(FACTORS), fault=FAULTS)
    def push_version(self, name: str, factor: float, fault: tuple[str, int] | None) -> None:
        ok, result, _ = self._attempt(fault, lambda w: push(w, name, scale_model(factor)))
        if ok:
            self.versions[(name, result)] = hashlib.sha256(scale_model(factor)).hexdigest()

    @precondition(lambda self: bool(self.versions))
    @rule(data=st.data(), alias=st.sampled_from(ALIASES), fault=FAULTS)
    def set_alias(self, data: st.DataObject, alias: str, fault: tuple[str, int] | None) -> None:
        name, number = data.draw(st.sampled_from(sorted(self.versions)))
        ok, _, fired = self._attempt(fault, lambda w: w.aliases.set(name, alias, number))
        if ok:
            self.aliases[(name, alias)] = {number}
        elif fired and (name, alias) in self.aliases:
            self.aliases[(name, alias)].add(number)

    @precondition(lambda self: bool(self.versions))
    @rule(data=st.data(), canary=st.booleans(), fault=FAULTS)
    def deploy(self, data: st.DataObject, canary: bool, fault: tuple[str, int] | None) -> None:
        name, number = data.draw(st.sampled_from(sorted(self.versions)))
        options: dict[str, Any] = {"strategy": "canary", "canary_percent": 50.0, "bake_seconds": 0} if canary else {}
        ok, result, fired = self._attempt(fault, lambda w: w.deployments.deploy(name, number, **options))
        if ok:
            assert result.status.value == "SUCCEEDED", result
            self.serving[name] = {number}
        elif fired and name in self.serving:
            self.serving[name].add(number)

    @rule(name=st.sampled_from(NAMES), fault=FAULTS)
    def rollback(self, name: str, fault: tuple[str, int] | None) -> None:
        ok, result, fired = self._attempt(fault, lambda w: w.deployments.rollback(name))
        if ok:
            route = self.backend.registry.get_route(name)
            if result.status.value == "SUCCEEDED":  # the deployment now live
                assert route is not None and route.stable_version == result.stable_version, (route, result)
            self.serving[name] = {route.stable_version if route else None}
        elif fired:
            self.serving.pop(name, None)  # interrupted: any READY version may serve

    @precondition(lambda self: bool(self.versions))
    @rule(data=st.data(), fault=FAULTS)
    def delete_version(self, data: st.DataObject, fault: tuple[str, int] | None) -> None:
        name, number = data.draw(st.sampled_from(sorted(self.versions)))
        referenced = any(self.aliases.get((name, alias)) == {number} for alias in ALIASES) or \
            self.serving.get(name) == {number}
        ok, result, fired = self._attempt(fault, lambda w: w.models.delete_version(name, number))
        if ok:
            assert not referenced, f"deleted v{number} of {name} while an alias or the route uses it"
            del self.versions[(name, number)]
        elif fired:
            self.versions.pop((name, number))  # interrupted: it may be gone
        else:
            assert isinstance(result, Conflict), result  # refused: in use

    @rule(name=st.sampled_from(NAMES), fault=FAULTS)
    def delete_model(self, name: str, fault: tuple[str, int] | None) -> None:
        ok, result, fired = self._attempt(fault, lambda w: w.models.delete_model(name, force=True))
        if not ok and not fired:
            assert isinstance(result, NotFound) and name not in self.models, result  # never acknowledged
        self._forget(name)
        if ok:
            assert not self._exists(name)

    @rule(expire=st.booleans())
    def cleanup(self, expire: bool) -> None:
        now = datetime.now(UTC) + (LATER if expire else timedelta(0))
        CleanupService(self.backend.registry, self.backend.artifacts, self.backend.settings.limits).run(now)

    @rule()
    def restart(self) -> None:
        self.backend.close()
        self._open()
        self.sound.deployments.recover_interrupted()

    # --- checks -----------------------------------------------------------------------------------
    @invariant()
    def invariants_hold(self) -> None:
        STATS["steps"] += 1
        assert check_invariants(self.backend.registry, self.backend.artifacts) == []

    @invariant()
    def acknowledged_writes_survive(self) -> None:
        registry = self.backend.registry
        for name in self.models:
            registry.get_model(name)
        for (name, number), digest in self.versions.items():
            version = registry.get_version(name, number)
            assert version.status is VersionStatus.READY and version.sha256 == digest, version
        for (name, alias), allowed in self.aliases.items():
            assert registry.get_alias(name, alias).version in allowed, (name, alias, allowed)
        for name, serving in self.serving.items():
            route = registry.get_route(name)
            assert (route.stable_version if route else None) in serving, (name, route, serving)

    # --- helpers ----------------------------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        try:
            self.backend.registry.get_model(name)
        except NotFound:
            return False
        return True

    def _forget(self, name: str) -> None:
        self.models.discard(name)
        self.versions = {key: digest for key, digest in self.versions.items() if key[0] != name}
        self.aliases = {key: value for key, value in self.aliases.items() if key[0] != name}
        self.serving.pop(name, None)


def _disk_error(name: str) -> BaseException:
    return sqlite3.OperationalError(f"disk I/O error (injected at {name})")


FaultySequences.TestCase.settings = settings(
    max_examples=250, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], print_blob=True,
)
test_random_operations_and_faults_keep_the_invariants = FaultySequences.TestCase



def test_the_sequences_injected_faults() -> None:
    """Runs after the state machine (file order): it did inject faults, and says how many."""
    if not STATS["sequences"]:
        pytest.skip("the state machine did not run")
    print(f"\nfault sequences: {STATS}")
    assert STATS["faults fired"] >= 250 and STATS["acknowledged"] >= 1000
