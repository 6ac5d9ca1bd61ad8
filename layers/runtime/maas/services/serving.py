"""Which version answers an inference request.

Looked up on every request, so registry reads are cached for a short TTL: a deploy or rollback made
through this process invalidates at once, one made elsewhere (another server on the same store, the
AWS deploy workflow) reaches this process within ``ttl_s``."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from maas.domain import ModelVersion, Route, Token, VersionStatus, check_model_name
from maas.domain import Scope as TokenScope
from maas.errors import Forbidden, NotFound, NotReady, StorageCorrupted
from maas.ports import ArtifactStore, Registry
from maas.services.invariants import artifact_of
from maas.services.models import ModelService


def artifact_reader(artifacts: ArtifactStore) -> Callable[[ModelVersion], bytes]:
    """What an ``InferenceEngine`` loads a READY version's bytes with (the engine re-hashes them)."""

    def read(version: ModelVersion) -> bytes:
        assert version.sha256 is not None
        try:
            return artifacts.read(artifact_of(version.sha256, version.size, version.storage_key,
                                              version.storage_version_id))
        except NotFound:
            # A READY version whose bytes vanished is a storage fault, not a missing resource.
            raise StorageCorrupted(f"the artifact of {version.model!r} version {version.version} is missing "
                                   "from storage") from None

    return read


class ServingResolver:
    def __init__(self, registry: Registry, models: ModelService, *, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, rng: Callable[[], float] = random.random):
        self._registry = registry
        self._models = models
        self._ttl = ttl_s
        self._clock = clock
        self._rng = rng
        self._routes: dict[str, tuple[float, Route | None]] = {}
        self._versions: dict[tuple[str, int], tuple[float, ModelVersion]] = {}
        self._lock = threading.Lock()

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._routes.clear()
                self._versions.clear()
                return
            self._routes.pop(name, None)
            for key in [k for k in self._versions if k[0] == name]:
                self._versions.pop(key, None)

    def route(self, name: str) -> Route | None:
        now = self._clock()
        cached = self._routes.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        check_model_name(name)
        route = self._registry.get_route(name)
        if route is None:
            self._registry.get_model(name)  # NotFound for an unknown model
        with self._lock:
            self._routes[name] = (now + self._ttl, route)
        return route

    def version(self, name: str, number: int) -> ModelVersion:
        now = self._clock()
        cached = self._versions.get((name, number))
        if cached is not None and cached[0] > now:
            return cached[1]
        found = self._registry.get_version(name, number)
        if found.status is not VersionStatus.READY:
            raise NotReady(f"version {number} of {name!r} is {found.status.value}, not READY")
        with self._lock:
            self._versions[(name, number)] = (now + self._ttl, found)
        return found

    def pick_for(self, token: Token, name: str, ref: str | None = None) -> tuple[ModelVersion, bool]:
        """The version ``token`` may run, and whether the router chose it (False: the URL named it).

        Who may name a version: an invoke token only the live ones (the route's stable version and a
        canary in flight), so a version that is not deployed, or was rolled back as unhealthy, never
        answers an application; a deploy (or admin) token any READY version, to try one before deploying
        it or to look into why it was rolled back."""
        chosen = self.pick(name, ref)
        if ref is None:
            return chosen, True
        if not token.allows(TokenScope.DEPLOY, name):
            route = self.route(name)
            live = {route.stable_version, route.canary_version} if route is not None else set()
            if chosen.version not in live:
                raise Forbidden(f"version {chosen.version} of {name!r} is not live (not its stable version or a "
                                "canary in flight): an invoke token may call live versions only, a deploy token "
                                "any READY version")
        return chosen, False

    def pick(self, name: str, ref: str | None = None) -> ModelVersion:
        """The version to run: the one named (number or alias), else the route's stable or canary."""
        if ref is not None:
            return self.version(name, self._models.resolve(name, ref))
        route = self.route(name)
        if route is None:
            raise NotFound(f"model {name!r} is not deployed; deploy a version or name one in the URL")
        number = route.stable_version
        if route.canary_version is not None and route.canary_weight > 0 and \
                self._rng() * 100.0 < route.canary_weight:
            number = route.canary_version
        return self.version(name, number)
