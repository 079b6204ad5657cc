"""Admission control: what a tenant may have in flight at once.

Each tenant may have at most `max_requests` calls and `max_tokens` tokens in
flight; a fine-tune job counts against `max_fine_tunes`. Beyond that the call
is RESOURCE_EXHAUSTED at once, with a retry hint, instead of queueing: one
tenant cannot starve the others or grow the coordinator's memory without
bound. (Each worker's queue is bounded by the router, per tenant: a tenant
within these limits never makes another's calls fail.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Iterator

from coordinator.errors import ResourceExhausted

RETRY_AFTER_MS = 100


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """Per-tenant limits; see the module docstring.

    Attributes:
        max_requests: concurrent Forward calls per tenant.
        max_tokens: tokens in those calls together.
        max_fine_tunes: queued or running fine-tune jobs per tenant.
        max_queued_sequences_per_worker: sequences of one tenant a worker
            may hold (queued or running) before the router refuses more of
            that tenant's; other tenants' shares are untouched.
    """

    max_requests: int = 64
    max_tokens: int = 65536
    max_fine_tunes: int = 2
    max_queued_sequences_per_worker: int = 512

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be >= 1, got {getattr(self, field.name)}.")


class TenantAdmission:
    """Counts each tenant's calls and tokens in flight.

    Example:
    >>> admission = TenantAdmission(AdmissionLimits(max_requests=2))
    >>> with admission.admit("acme", tokens=12):
    ...     ...  # run the call
    """

    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self._requests: collections.Counter[str] = collections.Counter()
        self._tokens: collections.Counter[str] = collections.Counter()
        self.refused = 0

    @contextlib.contextmanager
    def admit(self, tenant: str, tokens: int) -> Iterator[None]:
        """Holds one call of `tokens` tokens for `tenant`, or raises
        ResourceExhausted when that would pass a limit."""
        limits = self.limits
        if tokens > limits.max_tokens:
            raise ResourceExhausted(f"the request has {tokens} tokens; a tenant may have at "
                                    f"most {limits.max_tokens} in flight. Split it.")
        if self._requests[tenant] >= limits.max_requests:
            self.refused += 1
            raise ResourceExhausted(
                f"this tenant already has {limits.max_requests} calls in flight (the limit); "
                f"retry after {RETRY_AFTER_MS} ms.", retry_after_ms=RETRY_AFTER_MS)
        if self._tokens[tenant] + tokens > limits.max_tokens:
            self.refused += 1
            raise ResourceExhausted(
                f"this tenant has {self._tokens[tenant]} tokens in flight and the limit is "
                f"{limits.max_tokens}; retry after {RETRY_AFTER_MS} ms.",
                retry_after_ms=RETRY_AFTER_MS)
        self._requests[tenant] += 1
        self._tokens[tenant] += tokens
        try:
            yield
        finally:
            self._requests[tenant] -= 1
            self._tokens[tenant] -= tokens
            if not self._requests[tenant]:  # keep the counters as small as the tenants active
                del self._requests[tenant], self._tokens[tenant]

    def in_flight(self, tenant: str) -> tuple[int, int]:
        return self._requests[tenant], self._tokens[tenant]
