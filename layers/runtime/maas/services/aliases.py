"""Aliases (``champion``, ``stable``...): movable names for versions, switched in one conditional write."""

from __future__ import annotations

from maas.domain import Alias, check_alias_name, check_model_name, check_version_number
from maas.ports import Registry


class AliasService:
    def __init__(self, registry: Registry):
        self._registry = registry

    def set(self, name: str, alias: str, version: int | str) -> Alias:
        return self._registry.set_alias(check_model_name(name), check_alias_name(alias),
                                        check_version_number(version))

    def get(self, name: str, alias: str) -> Alias:
        return self._registry.get_alias(check_model_name(name), check_alias_name(alias))

    def list(self, name: str) -> list[Alias]:
        check_model_name(name)
        self._registry.get_model(name)
        return self._registry.list_aliases(name)

    def delete(self, name: str, alias: str) -> None:
        self._registry.delete_alias(check_model_name(name), check_alias_name(alias))
