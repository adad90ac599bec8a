"""The gateway's GET /v1/models shows each catalog model's chat template in use, in the CPU engine's shape, before
any instance runs: a transformers-written checkpoint with its own template (`{source: "checkpoint", file, sha256}`)
and a generated one without (`{source: "built-in", format}`), served by `python -m experiments.serve`; a chat
request through the gateway is then prompted with that very template (transformers' `apply_chat_template` ids)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

for _dep in ("torch", "safetensors", "tokenizers", "transformers", "uvicorn", "openai"):
    pytest.importorskip(_dep)

from live.engines.cpu_api import BUILT_IN_TEMPLATE  # noqa: E402
from live.gateway import AgentRef, GatewayConfig, Tenant  # noqa: E402
from tests.live_engine.test_chat_template import ALTERNATE  # noqa: E402
from tests.live_engine.test_chat_template import checkpoint as templated  # noqa: E402, F401 (a fixture)
from tests.live_serve.serving import serve  # noqa: E402


def test_catalog_models_show_their_chat_template(templated: Path, tmp_path: Path) -> None:  # noqa: F811
    import transformers

    overrides = ["~catalog", f"+catalog.chat={{local_dir:'{templated}'}}", "+catalog.plain={preset: tiny, seed: 0}",
                 "nodes=1"]
    with serve(tmp_path, overrides) as s:
        listing = httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {s.key}"}, timeout=30)
        assert listing.status_code == 200, listing.text
        items = {item["id"]: item for item in listing.json()["data"]}
        # shown from the checkpoints: no instance has run
        assert s.metric('tierlab_instances{status="ready"}') == s.metric('tierlab_instances{status="loading"}') == 0
        jinja = templated / "chat_template.jinja"
        assert items["chat"]["chat_template"] == {
            "source": "checkpoint", "file": str(jinja), "sha256": hashlib.sha256(jinja.read_bytes()).hexdigest()}
        assert items["plain"]["chat_template"] == {"source": "built-in", "format": BUILT_IN_TEMPLATE}
        assert {k: items["plain"][k] for k in ("object", "owned_by")} == {"object": "model", "owned_by": "tierlab"}
        by_client = {m.id: m.model_dump() for m in s.client().models.list()}  # the openai client keeps the field
        assert by_client["chat"]["chat_template"] == items["chat"]["chat_template"]

        # the template shown is the one the engine prompts with: transformers' ids for these messages
        want = transformers.AutoTokenizer.from_pretrained(templated).apply_chat_template(
            ALTERNATE, tokenize=True, add_generation_prompt=True)["input_ids"]
        r = s.client().chat.completions.create(model="chat", messages=ALTERNATE, max_tokens=2, temperature=0)
        assert r.usage is not None and r.usage.prompt_tokens == len(want)
        s.stop()


def test_model_details_must_name_served_models() -> None:
    with pytest.raises(ValueError, match=r"model_details names models not served \['ghost'\]"):
        GatewayConfig(agents=[AgentRef("n0", "", "")], tenants={"sk": Tenant("t", ("a",))},
                      model_details={"ghost": {"chat_template": {"source": "built-in"}}})
