"""An agent given a certificate serves its control API over HTTPS only (a certificate made at test time): a
client trusting the test CA is served (the token still required), one that does not trust it is refused at the
handshake, and plain HTTP gets no answer."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from live.agent_config import config_from_args
from tests.tls_certs import make_certs

from .conftest import MODEL, TOKEN


def test_an_agent_with_a_certificate_serves_https_only(tmp_path: Path, cloud, start_agent) -> None:
    certs = make_certs(tmp_path / "pki")
    agent = start_agent(cloud.url, {"sata": 1 << 30}, tls=certs)
    assert agent.url.startswith("https://127.0.0.1:")
    assert agent.status()["node"]
    assert agent.post("/tiers/copy", {"model": MODEL, "to_tier": "sata"}).status_code == 200
    with httpx.Client(base_url=agent.url, verify=ssl.create_default_context(cafile=certs.ca), timeout=10) as anonymous:
        assert anonymous.get("/status").status_code == 401  # TLS is no substitute for the token
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(agent.url + "/healthz", timeout=10)  # the system's CAs do not know the test CA
    with pytest.raises(httpx.HTTPError):
        r = httpx.get(agent.url.replace("https://", "http://") + "/healthz", timeout=5)
        r.raise_for_status()


def test_tls_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--token", TOKEN, "--store", "file:///x", "--tier", f"sata={tmp_path}:1G"]
    certs = make_certs(tmp_path / "pki")
    config, _ = config_from_args([*base, "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)])
    assert (config.tls_cert, config.tls_key) == (certs.cert, certs.key)
    for flags, message in ((["--tls-cert", str(certs.cert)], "go together"),
                           (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(certs.key)], "no such file")):
        with pytest.raises(SystemExit):
            config_from_args([*base, *flags])
        assert message in capsys.readouterr().err
