"""`python -m experiments.serve` with a `tls` block serves the gateway over HTTPS (a certificate made at test
time): the `openai` client trusting the test CA gets a cold start and a warm answer, a client that does not trust
it is refused at the handshake, and a half-given or missing certificate is a config error naming the field."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

for _dep in ("torch", "uvicorn", "openai"):
    pytest.importorskip(_dep)
import httpx  # noqa: E402
import openai  # noqa: E402

from tests.live_serve.serving import checkpoint_cache, env, serve  # noqa: E402
from tests.tls_certs import make_certs  # noqa: E402


def test_the_gateway_serves_https_with_a_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    with serve(tmp_path, ["nodes=1", "~catalog.small-a", "~catalog.tiny-b", f"tls.cert={certs.cert}",
                          f"tls.key={certs.key}"]) as s:
        assert s.url.startswith("https://127.0.0.1:")
        trust = httpx.Client(verify=ssl.create_default_context(cafile=certs.ca), timeout=120)
        client = openai.OpenAI(base_url=s.info["openai_base_url"], api_key=s.key, max_retries=0, http_client=trust)
        for _ in range(2):  # a cold start, then warm
            out = client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3)
            assert out.choices[0].message.content is not None
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(s.url + "/healthz", timeout=10)
        summary = s.stop()
        assert summary["requests"] == 2 and summary["completed"] == 2, summary


@pytest.mark.parametrize(("overrides", "message"), [
    (["tls.cert=/nonexistent.pem", "tls.key=/nonexistent.key"], "tls.cert: no such file"),
    (["tls.cert=/nonexistent.pem"], "tls: cert and key go together"),
])
def test_bad_tls_config_is_an_error_naming_the_field(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "experiments.serve", "port=0", f"hydra.run.dir={tmp_path}",
                           f"checkpoint_cache={checkpoint_cache()}", "progress=false", *overrides],
                          capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
