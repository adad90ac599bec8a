"""Model versions through the whole stack: a tenant's models may be `name@revision` (pinned) beside `name` (the
registry alias's revision when an instance loads); the gateway routes each to instances of its own weights."""

from __future__ import annotations

from pathlib import Path

import openai

from live.checkpoint import generate_checkpoint
from live.gateway import AgentRef, Gateway, GatewayConfig, Tenant
from live.registry import Registry

from .conftest import ADMIN_TOKEN, AGENT_TOKEN, serving, start_agent, stop_agent

NAME = "tiny"


def test_pinned_revisions_and_the_alias_serve_their_own_weights(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'cloud'}"
    reg = Registry([store_url])
    v1 = reg.publish_version(NAME, generate_checkpoint(tmp_path / "v1" / NAME, "tiny", 0).path)
    v2 = reg.publish_version(NAME, generate_checkpoint(tmp_path / "v2" / NAME, "tiny", 1).path)  # alias -> v2
    proc, url = start_agent(tmp_path, "n0", store_url)
    try:
        models = (NAME, v1.ref, v2.ref)
        gateway = Gateway(GatewayConfig(agents=[AgentRef("n0", url, AGENT_TOKEN)], admin_token=ADMIN_TOKEN,
                                        tenants={"sk-a": Tenant("a", models)}))
        with serving(gateway) as gs:
            client = openai.OpenAI(base_url=gs.url + "/v1", api_key="sk-a", max_retries=0, timeout=120)
            listed = {m.id for m in client.models.list().data}
            assert listed == set(models)

            def text(model: str) -> str:
                out = client.completions.create(model=model, prompt="hello there", max_tokens=12, temperature=0)
                assert out.model == model
                return out.choices[0].text

            by_model = {m: text(m) for m in models}
            assert by_model[v1.ref] != by_model[v2.ref]  # two random models: other weights, other greedy tokens
            assert by_model[NAME] == by_model[v2.ref]  # the alias named v2 when `tiny` loaded
            records = gs.gateway.records()
            assert sorted(records["model"]) == sorted(models) and set(records["outcome"]) == {"completed"}
            assert len(set(records["instance"])) == 3  # one instance per name: a pin is a model of its own
    finally:
        stop_agent(proc)
