"""Per-tenant admission: limits hold, are per tenant, and are given back."""

import pytest

from coordinator.admission_control import AdmissionLimits, TenantAdmission
from coordinator.errors import ResourceExhausted


def test_limits_are_per_tenant_and_released():
    admission = TenantAdmission(AdmissionLimits(max_requests=2, max_tokens=100))
    with admission.admit("acme", 40), admission.admit("acme", 40):
        with pytest.raises(ResourceExhausted, match="2 calls in flight") as caught:
            with admission.admit("acme", 1):
                pass
        assert caught.value.retry_after_ms == 100
        with admission.admit("globex", 90):  # another tenant is not affected
            assert admission.in_flight("globex") == (1, 90)
    assert admission.in_flight("acme") == (0, 0)
    with admission.admit("acme", 60):
        with pytest.raises(ResourceExhausted, match="60 tokens in flight"):
            with admission.admit("acme", 41):
                pass
    with pytest.raises(ResourceExhausted, match="Split it"):
        with admission.admit("acme", 101):
            pass
    assert admission.refused == 2


def test_a_failing_call_gives_its_share_back():
    admission = TenantAdmission(AdmissionLimits(max_requests=1))
    with pytest.raises(RuntimeError):
        with admission.admit("acme", 5):
            raise RuntimeError("worker fell over")
    with admission.admit("acme", 5):
        pass


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        AdmissionLimits(max_tokens=0)
