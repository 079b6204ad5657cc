"""API keys to tenants: who is calling.

Keys come from a JSON file `{"<key>": "<tenant>", ...}` or the environment
variable GEMMA_SERVE_API_KEYS (`tenant=key,tenant=key`). Only SHA-256
digests of the keys are kept, and a key is found by its digest, so lookups
do not leak how much of a wrong key matched. With no keys configured, auth
is off and every caller is the one tenant `default`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from coordinator.errors import Unauthenticated

DEFAULT_TENANT = "default"
KEYS_ENV = "GEMMA_SERVE_API_KEYS"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantAuth:
    """Maps the `authorization: Bearer <key>` metadata of a call to a tenant.

    Example:
    >>> auth = TenantAuth({"s3cret": "acme"})
    >>> auth.tenant_for_metadata([("authorization", "Bearer s3cret")])
    'acme'
    """

    def __init__(self, keys: dict[str, str] | None = None):
        self._tenants = {}
        for key, tenant in (keys or {}).items():
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError("API keys must be strings of at least 8 characters.")
            if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
                raise ValueError(f"tenant {tenant!r}: use 1-64 letters, digits, '_', '.', '-', "
                                 "starting with a letter or digit.")
            self._tenants[_digest(key)] = tenant

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
                with open(keys_file) as handle:
                    keys = json.load(handle)
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"cannot read the API keys file {keys_file}: {error}") from None
            if not isinstance(keys, dict):
                raise ValueError(f"{keys_file} must hold a JSON object "
                                 '{"<key>": "<tenant>", ...}.')
            return cls(keys)
        spec = environ.get(KEYS_ENV, "").strip()
        if not spec:
            return cls()
        keys = {}
        for item in spec.split(","):
            tenant, sep, key = item.strip().partition("=")
            if not sep:
                raise ValueError(f"{KEYS_ENV} entries are tenant=key, got {item.strip()!r}.")
            keys[key] = tenant
        return cls(keys)

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
