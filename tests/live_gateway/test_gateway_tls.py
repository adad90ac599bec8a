"""The gateway over an agent that serves HTTPS (a certificate made at test time): with the agents' CA
configured (`GatewayConfig.agent_ca`) it drives the agent and serves a cold start through it; without it, the
agent's certificate is not trusted, the node is never used, and the request is refused cleanly. The gateway
itself serves HTTPS when uvicorn is given a certificate."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from live.gateway import AgentRef, Gateway, GatewayConfig
from tests.tls_certs import make_certs

from .conftest import ADMIN_TOKEN, AGENT_TOKEN, KEYS, MODEL, publish_tiny, serving, start_agent, stop_agent


def test_the_gateway_verifies_https_agents(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    store_url = publish_tiny(tmp_path)
    proc, url = start_agent(tmp_path, "n0", store_url, tls=certs)
    try:
        assert url.startswith("https://")
        trusted = Gateway(GatewayConfig(agents=[AgentRef("n0", url, AGENT_TOKEN)], tenants=KEYS,
                                        admin_token=ADMIN_TOKEN, agent_ca=str(certs.ca)))
        with serving(trusted) as gs:
            client = openai.OpenAI(base_url=gs.url + "/v1", api_key="sk-alice", max_retries=0, timeout=120)
            out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3)
            assert out.choices[0].message.content is not None
            assert gs.gateway.records()["outcome"].tolist() == ["completed"]
        untrusted = Gateway(GatewayConfig(agents=[AgentRef("n0", url, AGENT_TOKEN)], tenants=KEYS,
                                          admin_token=ADMIN_TOKEN, queue_timeout_s=2.0))
        with serving(untrusted) as gs:
            r = httpx.post(gs.url + "/v1/chat/completions", timeout=60, headers={"Authorization": "Bearer sk-alice"},
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert r.status_code in (502, 503) and r.json()["error"]["message"]
            assert gs.gateway.records()["outcome"].tolist() != ["completed"]
    finally:
        stop_agent(proc)
