"""API key configuration is checked at start: every mistake stops the
server with a message naming the entry (and its tenant where that is safe),
never the key."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from coordinator.errors import Unauthenticated
from coordinator.tenant_auth import KEYS_ENV, TenantAuth

BIN = pathlib.Path(sys.executable).parent
KEY, OTHER = "key-0123456789", "key-9876543210"


def from_env(spec):
    return TenantAuth.from_sources(environ={KEYS_ENV: spec})


def from_file(tmp_path, text):
    path = tmp_path / "keys.json"
    path.write_text(text, encoding="utf-8")
    return TenantAuth.from_sources(str(path))


def refusal(make, *secrets):
    with pytest.raises(ValueError) as refused:
        make()
    message = str(refused.value)
    for secret in secrets:
        assert secret.strip() not in message, message
    return message


def test_valid_keys_map_to_their_tenants(tmp_path):
    # Space after a comma is layout; a tenant may hold several keys (rotation).
    auth = from_env(f"acme={KEY}, globex={OTHER},acme=key-rotated-000")
    assert auth.tenants() == ["acme", "globex"]
    assert auth.tenant_for_metadata([("authorization", f"Bearer {OTHER}")]) == "globex"
    assert auth.tenant_for_metadata([("authorization", "Bearer key-rotated-000")]) == "acme"
    with pytest.raises(Unauthenticated):
        auth.tenant_for_metadata([("authorization", "Bearer key-unknown-000")])
    assert from_file(tmp_path, json.dumps({KEY: "acme"})).tenants() == ["acme"]
    assert not from_env("  ").enabled  # unset or blank: auth off


def test_one_key_for_two_tenants_is_refused(tmp_path):
    message = refusal(lambda: from_env(f"acme={KEY},globex={KEY}"), KEY)
    assert message.startswith(f"{KEYS_ENV}, entry 2 (tenant globex)")
    assert "entry 1 (tenant acme)" in message
    # In a JSON file the second occurrence would silently replace the first.
    message = refusal(lambda: from_file(
        tmp_path, f'{{"{KEY}": "acme", "{OTHER}": "initech", "{KEY}": "globex"}}'), KEY)
    assert "keys.json, entry 3 (tenant globex)" in message and "tenant acme" in message
    message = refusal(lambda: from_env(f"acme={KEY},acme={KEY}"), KEY)
    assert "give each key once" in message


@pytest.mark.parametrize("key", [" key-0123456789", "key-0123456789 ", "key 0123456789",
                                 "key-0123\t456789", "key-0123456789\n"])
def test_whitespace_in_a_key_is_refused_not_stripped(tmp_path, key):
    message = refusal(lambda: from_file(tmp_path, json.dumps({key: "acme"})), key)
    assert "(tenant acme): the API key contains whitespace" in message


def test_whitespace_in_the_environment_variable(tmp_path):
    for spec in (f"acme= {KEY}", f"acme={KEY} ,globex={OTHER}", f"globex={OTHER},acme=key 0123"):
        message = refusal(lambda: from_env(spec), KEY, OTHER, "key 0123")
        assert "(tenant acme): the API key contains whitespace" in message


@pytest.mark.parametrize("key", ["kéy-0123456789", "key-\u200b0123456789", "key-\x010123456789",
                                 "key-0123456789\x7f"])
def test_keys_no_client_can_send_are_refused(tmp_path, key):
    for make in (lambda: from_env(f"acme={key}"),
                 lambda: from_file(tmp_path, json.dumps({key: "acme"}, ensure_ascii=False))):
        message = refusal(make, key)
        assert "(tenant acme): the API key has non-ASCII or non-printable" in message


def test_bad_tenant_names_and_short_keys(tmp_path):
    assert "entry 2: the tenant name is empty" in refusal(
        lambda: from_env(f"acme={KEY},={OTHER}"), OTHER)
    assert "entry 1: the tenant name is empty" in refusal(
        lambda: from_file(tmp_path, json.dumps({KEY: ""})), KEY)
    assert "entry 1: the tenant name is not valid" in refusal(
        lambda: from_env(f"ac me={KEY}"), KEY)
    # A key written where the tenant goes is never printed, whichever check
    # catches it.
    message = refusal(lambda: from_env(f"{KEY}=acme"), KEY)
    assert "at least 8 characters" in message and "wrong way round" in message
    assert "entry 2: the API key is not a string of at least 8 characters" in refusal(
        lambda: from_file(tmp_path, json.dumps({KEY: "acme", "short": "globex"})), KEY)
    assert "entry 1: write tenant=key" in refusal(lambda: from_env(KEY), KEY)


def test_bad_key_files(tmp_path):
    assert "must hold a JSON object" in refusal(lambda: from_file(tmp_path, f'["{KEY}"]'), KEY)
    assert "holds no keys" in refusal(lambda: from_file(tmp_path, "{}"))
    message = refusal(lambda: from_file(tmp_path, f'{{"{KEY}": "acme",'), KEY)
    assert "cannot read the API keys file" in message and "line 1" in message
    assert "cannot read" in refusal(lambda: TenantAuth.from_sources(str(tmp_path / "none")))


def test_gemma_serve_exits_with_the_message(tmp_path):
    env = {**os.environ, KEYS_ENV: f"acme={KEY},globex= {OTHER}"}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([BIN / "gemma-serve", "--port", "0", "--metrics-port", "-1",
                          "--data-dir", str(tmp_path / "data")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert (f"gemma-serve: {KEYS_ENV}, entry 2 (tenant globex): the API key contains "
            "whitespace") in run.stderr
    assert KEY not in run.stderr + run.stdout and OTHER not in run.stderr + run.stdout
    assert "ready on" not in run.stdout


def test_tenant_names_follow_the_one_name_rule_of_the_registry():
    """A tenant names folders of the adapter registry and dataset store: the
    keys accept exactly the names those accept, by the one pattern."""
    from coordinator import adapter_record, tenant_auth
    assert not hasattr(tenant_auth, "TENANT_NAME")
    assert tenant_auth.NAME_PATTERN is adapter_record.NAME_PATTERN
    for name in ("acme", "a", "A-1_b.c", "9" * 64, "x" * 65, "-acme", ".acme", "ac me",
                 "acmé", "acme/x", ""):
        try:
            adapter_record.check_name("tenant", name)
            valid = True
        except Exception:  # noqa: BLE001
            valid = False
        try:
            TenantAuth({KEY: name})
            accepted = True
        except ValueError as error:
            accepted = False
            assert name == "" or adapter_record.NAME_FORM in str(error)
        assert accepted == valid, name
