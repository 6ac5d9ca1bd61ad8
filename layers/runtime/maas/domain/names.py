"""Name rules. Names end up in storage keys and URLs, so they are strict ASCII allow-lists:
nothing that could traverse a path, hide a look-alike character or need escaping."""

from __future__ import annotations

import re

from maas.errors import InvalidInput

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
MAX_VERSION = 999_999_999
#: A version in a path: a number (1 to MAX_VERSION) or an alias.
VERSION_REF = re.compile(r"[1-9][0-9]{0,8}|" + ALIAS_NAME.pattern)


def check_model_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InvalidInput(
            "model name must be 1-63 characters of lowercase letters, digits and '-', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def check_alias_name(alias: str, field: str = "alias") -> str:
    if not isinstance(alias, str) or not ALIAS_NAME.fullmatch(alias) or alias == "latest":
        raise InvalidInput(
            "alias must be 1-63 characters of lowercase letters, digits and '-', starting with a "
            "letter ('latest' is reserved)",
            field=field,
        )
    return alias


def check_token_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise InvalidInput("token name must be 1-64 characters of letters, digits, ' ', '_', '.', '-'",
                           field=field)
    return name


def check_version_number(version: int | str, field: str = "version") -> int:
    """Versions are positive integers; strings are accepted only in plain decimal form."""
    if isinstance(version, bool):
        raise InvalidInput("version must be a positive integer", field=field)
    if isinstance(version, str):
        if not version.isascii() or not version.isdigit() or len(version) > 9:
            raise InvalidInput("version must be a positive integer", field=field)
        version = int(version)
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidInput("version must be a positive integer", field=field)
    return version
