"""API keys to tenants: who is calling.

Keys come from a JSON file `{"<key>": "<tenant>", ...}` or the environment
variable GEMMA_SERVE_API_KEYS (`tenant=key,tenant=key`). Only SHA-256
digests of the keys are kept, and a key is found by its digest, so lookups
do not leak how much of a wrong key matched. With no keys configured, auth
is off and every caller is the one tenant `default`.

Every entry is checked at start, and a bad one stops the server: a key
given twice (which tenant would it be?), a key no client can send (with
whitespace, non-ASCII or control characters), a short key, a bad tenant
name. Messages name the entry and its tenant, never the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Mapping

from coordinator.adapter_record import NAME_FORM, NAME_PATTERN
from coordinator.errors import Unauthenticated

DEFAULT_TENANT = "default"
KEYS_ENV = "GEMMA_SERVE_API_KEYS"
MIN_KEY_LENGTH = 8
# What an `authorization` metadata value can carry after "Bearer ":
# printable ASCII without the space.
KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def checked_keys(entries: Iterable[tuple[object, object]], source: str) -> dict[str, str]:
    """`{key: tenant}` from (key, tenant) entries, each checked.

    Raises:
        ValueError: an entry is wrong; the message names `source`, the
            entry's place and its tenant (when that name is valid), never
            the key.
    """
    keys: dict[str, str] = {}
    places: dict[str, int] = {}
    for place, (key, tenant) in enumerate(entries, 1):
        where = f"{source}, entry {place}"
        # An invalid name is not printed: it may be a key in the wrong place.
        # Checked first, so that later messages can name the tenant.
        if not isinstance(tenant, str):
            raise ValueError(f"{where}: the tenant name is not a string.")
        if not tenant:
            raise ValueError(f"{where}: the tenant name is empty.")
        if not NAME_PATTERN.fullmatch(tenant):  # it names the tenant's folders
            raise ValueError(f"{where}: the tenant name is not valid: use {NAME_FORM}.")
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
            # The tenant goes unnamed here: a short "key" beside a long
            # "tenant" is most often an entry written the wrong way round.
            raise ValueError(f"{where}: the API key is not a string of at least "
                             f"{MIN_KEY_LENGTH} characters (or is the entry the wrong way "
                             "round?).")
        where = f"{where} (tenant {tenant})"
        problem = _key_problem(key)
        if problem:
            raise ValueError(f"{where}: the API key {problem}.")
        if key in keys:
            raise ValueError(f"{where}: the same API key is given in entry {places[key]} "
                             f"(tenant {keys[key]}); give each key once, to one tenant.")
        keys[key], places[key] = tenant, place
    return keys


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be sent by a client; None if it can."""
    if any(character.isspace() for character in key):
        # Not stripped: a key that differs from what the operator wrote
        # would be a surprise; one with a space inside matches no client.
        return "contains whitespace (at an end or inside); remove it"
    if not KEY_CHARACTERS.fullmatch(key):
        return ("has non-ASCII or non-printable characters, which gRPC metadata cannot "
                "carry; use printable ASCII (e.g. `openssl rand -hex 24`)")
    return None


class _JsonPairs(list):
    """A JSON object as its (name, value) pairs, duplicates kept."""


class TenantAuth:
    """Maps the `authorization: Bearer <key>` metadata of a call to a tenant.

    Args:
        keys: `{key: tenant}`, or (key, tenant) pairs; None or empty: auth off.
        source: where the keys came from, for error messages.

    Raises:
        ValueError: a key or tenant name is wrong (see `checked_keys`).

    Example:
    >>> auth = TenantAuth({"s3cret-key": "acme"})
    >>> auth.tenant_for_metadata([("authorization", "Bearer s3cret-key")])
    'acme'
    """

    def __init__(self, keys: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 source: str = "the API keys"):
        entries = keys.items() if isinstance(keys, Mapping) else (keys or ())
        self._tenants = {_digest(key): tenant
                         for key, tenant in checked_keys(entries, source).items()}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    @classmethod
    def from_sources(cls, keys_file: str | None = None,
                     environ: dict[str, str] | None = None) -> "TenantAuth":
        """Keys from `keys_file` if given, else from GEMMA_SERVE_API_KEYS,
        else none (auth off)."""
        environ = os.environ if environ is None else environ
        if keys_file:
            try:
                with open(keys_file, encoding="utf-8") as handle:
                    # Pairs, not a dict: a key written twice must not
                    # silently keep only its last tenant.
                    keys = json.load(handle, object_pairs_hook=_JsonPairs)
            except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
                # The parser's message quotes no content, only positions.
                raise ValueError(f"cannot read the API keys file {keys_file}: "
                                 f"{type(error).__name__}: {_position(error)}") from None
            if not isinstance(keys, _JsonPairs):
                raise ValueError(f"{keys_file} must hold a JSON object "
                                 '{"<key>": "<tenant>", ...}.')
            if not keys:  # asked for auth: an empty file must not turn it off
                raise ValueError(f"the API keys file {keys_file} holds no keys.")
            return cls(keys, source=f"the API keys file {keys_file}")
        # The variable's ends and the space after a comma are layout; all
        # other whitespace belongs to a key (and is refused there).
        spec = environ.get(KEYS_ENV, "").strip()
        if not spec:
            return cls()
        entries = []
        for place, item in enumerate(spec.split(","), 1):
            tenant, sep, key = item.lstrip().partition("=")
            if not sep:
                raise ValueError(f"{KEYS_ENV}, entry {place}: write tenant=key (entries "
                                 "separated by commas).")
            entries.append((key, tenant))
        return cls(entries, source=KEYS_ENV)

    def tenants(self) -> list[str]:
        return sorted(set(self._tenants.values())) if self.enabled else [DEFAULT_TENANT]

    def tenant_for_metadata(self, metadata) -> str:
        """The caller's tenant from its invocation metadata.

        Raises:
            Unauthenticated: auth is on and the key is missing or unknown.
        """
        if not self.enabled:
            return DEFAULT_TENANT
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise Unauthenticated("no API key: send metadata 'authorization: Bearer <key>'.")
        scheme, _, key = values[0].partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <key>'.")
        tenant = self._tenants.get(_digest(key.strip()))
        if tenant is None:
            raise Unauthenticated("the API key is not valid.")
        return tenant


def _position(error: Exception) -> str:
    """A parse error's message without any of the text it quotes."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 at byte {error.start}"
    return str(error)  # OSError: the path and the reason
