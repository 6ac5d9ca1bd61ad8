"""Helpers to walk paginated registry listings when a service needs every item."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

from maas.domain import Deployment, ModelVersion, Page
from maas.ports import Registry

T = TypeVar("T")


def iterate(fetch: Callable[[int, str | None], Page[T]], page_size: int = 500) -> Iterator[T]:
    cursor: str | None = None
    while True:
        page = fetch(page_size, cursor)
        yield from page.items
        if not page.next_cursor:
            return
        cursor = page.next_cursor


def all_versions(registry: Registry, model: str) -> Iterator[ModelVersion]:
    return iterate(functools.partial(registry.list_versions, model))


def all_deployments(registry: Registry, model: str) -> Iterator[Deployment]:
    return iterate(functools.partial(registry.list_deployments, model))
