"""gemma-serve processes with TLS, mutual TLS, tight admission limits and a
SIGTERM under load, joined to the test session's Ray."""

import datetime
import ipaddress
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.client import GemmaClient, tls_credentials
from service_support import shared_compilation_cache
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc

BIN = pathlib.Path(sys.executable).parent


def _cert(name, key, issuer_name, issuer_key, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    files = {"ca.pem": _cert("test CA", ca_key, ca_name, ca_key, ca=True)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}.pem"] = _cert(role, key, ca_name, ca_key, server=role == "server")
        (folder / f"{role}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    for name, cert in files.items():
        (folder / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


def start_serve(ray_session, tmp_path, *flags, shared_cache=True):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    env.pop("GEMMA_SERVE_API_KEYS", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "serve.log", "a")
    process = subprocess.Popen(
        [BIN / "gemma-serve", "--ray-address", ray_session.get_runtime_context().gcs_address,
         "--workers", "1", "--mesh", "1x1", "--port", "0", "--metrics-port", "-1",
         "--data-dir", str(tmp_path / "data"), "--length-buckets", "16,64",
         "--batch-buckets", "1,4",
         *(shared_compilation_cache() if shared_cache else []), *map(str, flags)],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    ready = process.stdout.readline()
    assert "gemma-serve ready on" in ready, (tmp_path / "serve.log").read_text()[-3000:]
    process.ready_line = ready
    return process, ready.split(" ready on ")[1].split()[0]


def embeddings_over_https(url, context):
    """(status, JSON) of one /v1/embeddings call to the ready line's `url`."""
    request = urllib.request.Request(
        f"{url}/embeddings", data=json.dumps({"model": "default", "input": "hi"}).encode(),
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        return response.status, json.loads(response.read())


def stop(process, sig=signal.SIGTERM, timeout=60):
    if process.poll() is None:
        os.killpg(process.pid, sig)
        process.wait(timeout)


def forward_once(channel, timeout=30):
    return list(pb_grpc.GemmaServiceStub(channel).Forward(
        pb.ForwardRequest(sequences=[pb.TokenSequence(ids=[1, 2, 3])]), timeout=timeout))


def test_tls_and_mutual_tls(ray_session, tmp_path, pki):
    tls, address = start_serve(ray_session, tmp_path / "tls", "--http-port", "0",
                               "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key")
    mtls, mtls_address = start_serve(
        ray_session, tmp_path / "mtls", "--http-port", "0", "--tls-cert", pki / "server.pem",
        "--tls-key", pki / "server.key", "--tls-client-ca", pki / "ca.pem")
    try:
        # The HTTP front serves TLS with the same certificates, mTLS with the same CA.
        urls = [p.ready_line.split(" http=")[1].split()[0] for p in (tls, mtls)]
        assert all(url.startswith("https://127.0.0.1:") for url in urls)
        trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        status, body = embeddings_over_https(urls[0], trusting)
        assert status == 200 and len(body["data"][0]["embedding"]) > 0
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            embeddings_over_https(urls[0], ssl.create_default_context())  # unknown CA
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            embeddings_over_https(urls[1], trusting)  # no client certificate
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(pki / "client.pem", pki / "client.key")
        assert embeddings_over_https(urls[1], with_cert)[0] == 200
        with grpc.insecure_channel(address) as plain:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as caught:
                forward_once(plain, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with GemmaClient(address, credentials=tls_credentials(pki / "ca.pem")) as client:
            assert np.isfinite(client.forward(token_ids=[[1, 2, 3]]).hidden_states[0][0]).all()
        with grpc.secure_channel(mtls_address, tls_credentials(pki / "ca.pem")) as no_cert:
            with pytest.raises(grpc.RpcError) as caught:
                forward_once(no_cert, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with GemmaClient(mtls_address, credentials=tls_credentials(
                pki / "ca.pem", pki / "client.pem", pki / "client.key")) as client:
            assert np.isfinite(client.forward(token_ids=[[1, 2, 3]]).hidden_states[0][0]).all()
    finally:
        stop(tls)
        stop(mtls)


def test_tenant_limits_and_sigterm_under_load(ray_session, tmp_path, local_model):
    process, address = start_serve(ray_session, tmp_path, "--tenant-max-requests", "2",
                                   "--tenant-max-fine-tunes", "1", "--shutdown-grace-s", "20")
    expected = np.asarray(local_model[0].hidden_states(
        {"token_ids": np.array([[5, 6, 7]]), "padding_mask": np.ones((1, 3), "int32")})[0])[0]
    outcomes, stop_sending = [], threading.Event()

    def load():
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GemmaServiceStub(channel)
            while not stop_sending.is_set():
                call = stub.Forward(pb.ForwardRequest(
                    sequences=[pb.TokenSequence(ids=[5, 6, 7])] * 4), timeout=60)
                try:
                    responses = list(call)
                    data = np.frombuffer(responses[1].chunk.data, "<f4").reshape(3, -1)
                    outcomes.append(("OK", np.allclose(data, expected, atol=1e-5)))
                except grpc.RpcError as error:
                    pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    outcomes.append((error.code().name, pushback))
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return

    try:
        with GemmaClient(address) as client:
            client.upload_adapter("kept", _adapter_file(local_model[0], tmp_path))
            job = client.start_fine_tune("never", texts=["a b c d e f g"] * 4, steps=100_000,
                                         batch_size=2, sequence_length=16)
            with pytest.raises(grpc.RpcError) as caught:  # one job per tenant here
                client.start_fine_tune("second", texts=["a b c"], steps=1)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        sent_at = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(0.5)
        with grpc.insecure_channel(address) as late:  # draining: new calls are refused
            with pytest.raises(grpc.RpcError) as caught:
                forward_once(late, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stop_sending.set()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "a call hung"
        assert process.wait(60) == 0
        assert time.monotonic() - sent_at < 40
    finally:
        stop(process, signal.SIGKILL)
    codes = {code for code, _ in outcomes}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, codes
    assert all(ok for code, ok in outcomes if code == "OK") and "OK" in codes
    assert "RESOURCE_EXHAUSTED" in codes  # 6 callers, 2 allowed at once
    assert all(hint == "100" for code, hint in outcomes if code == "RESOURCE_EXHAUSTED")
    # After the restart: the registry is whole, the interrupted job published nothing.
    process, address = start_serve(ray_session, tmp_path)
    try:
        with GemmaClient(address) as client:
            assert [a["adapter_id"] for a in client.list_adapters()] == ["kept@1"]
            client.load_adapter("kept@1")
        quarantine = tmp_path / "data" / "adapters" / ".quarantine"
        assert not quarantine.exists() or not any(quarantine.iterdir())
    finally:
        stop(process)
    assert job["job_id"]


def _adapter_file(backbone, tmp_path):
    from gemma_core import LoraAdapter
    path = tmp_path / "kept.lora.h5"
    LoraAdapter.random(backbone.config, rank=2, std=0.1).write_lora_file(path, backbone.config)
    return path
