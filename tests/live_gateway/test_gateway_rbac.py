"""Access control and the audit log of the gateway (`live.gateway_auth`, `live.gateway_admin`): every route against
every role, keys held as hashes only, key rotation without a restart (keys file, admin API), an operator's tier
moves on a real agent, an audit entry for every /admin call with an intact hash chain, and no key in any output.

Real gateways (uvicorn on loopback) over null engines; the tier moves over a real `python -m live.agent`."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from live import gateway_auth
from live.audit import read_entries, verify
from live.checkpoint import generate_checkpoint
from live.engines.null_server import NullEngineProcess
from live.gateway import Gateway
from live.gateway_auth import PERMISSIONS, ROUTES, KeyStore, Principal, hash_key, load_keys_file
from live.llama_config import model_spec
from tests.live_gateway.conftest import (
    ADMIN_TOKEN,
    MODEL,
    REPO,
    GatewayServer,
    cluster,
    serving,
    static_config,
)

StartEngine = Callable[..., NullEngineProcess]
TENANT_KEY, OTHER_TENANT_KEY = "sk-alice", "sk-bob"
OPERATOR_KEY = "op-7f3c9a1e5b2d4c6e8a0b"
FILE_KEY_V1, FILE_KEY_V2 = "sk-carol-first-4e1d9b", "sk-carol-second-a27c55"
UNKNOWN_KEY = "sk-nobody-8c2e"
OPERATOR = {"name": "ops", "role": "operator", "key": OPERATOR_KEY}
PUBLIC = {("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/openapi.json")}
# the agents' plane (live.gateway_agents): authenticated by an agent token, which no role's key is
AGENT_PLANE = {("POST", "/agents/join"), ("POST", "/agents/leave")}


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def write_keys(path: Path, *entries: dict[str, Any]) -> None:
    """Replace the keys file at once (rename), as an operator's tooling would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"principals": list(entries)}))
    tmp.replace(path)


def carol(key: str) -> dict[str, Any]:
    return {"name": "carol", "role": "tenant", "models": [MODEL], "key": key}


@pytest.fixture(scope="module")
def gs(null_engines: StartEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway with tenant, operator and admin keys, a keys file (tenant carol) and an audit log; `tiny` on a
    null engine."""
    tmp = tmp_path_factory.mktemp("rbac")
    keys_file = tmp / "keys.json"
    write_keys(keys_file, carol(FILE_KEY_V1))
    engine = null_engines()
    gw = Gateway(static_config(principals=[dict(OPERATOR)], keys_file=str(keys_file), audit_log=str(tmp / "a.jsonl"),
                               tick=False))
    with serving(gw) as served:
        gw.adopt_instance(MODEL, "s0", engine.url)  # no request is in flight yet
        yield served


def chat(model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# what each route is sent in the matrix: a body that passes validation where it needs one
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/chat/completions"): chat(),
    ("POST", "/v1/completions"): {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    ("POST", "/admin/tiers/copy"): {"node": "s0", "model": MODEL, "to_tier": "dram"},
    ("POST", "/admin/tiers/evict"): {"node": "s0", "model": MODEL, "tier": "dram"},
    ("POST", "/admin/keys"): {"name": "matrix", "role": "tenant", "models": [MODEL]},
}


def call(gs: GatewayServer, method: str, path: str, key: str | None, **kw: Any) -> httpx.Response:
    url = gs.url + path.replace("{key_id}", "0123456789abcdef")  # a fingerprint no key has
    body = BODIES.get((method, path))
    return httpx.request(method, url, headers=auth(key), json=body, timeout=30, **kw)


# ---------------------------------------------------------------------------------------------- the table


def test_permission_table_is_the_documented_one(gs: GatewayServer) -> None:
    assert PERMISSIONS["tenant"] == {"serve"}
    assert PERMISSIONS["operator"] == {"records.read", "actions.read", "audit.read", "tiers.move"}
    assert PERMISSIONS["admin"] == PERMISSIONS["operator"] | {"keys.manage"}
    app_routes = {(m, r.path) for r in gs.server.config.app.routes for m in r.methods - {"HEAD"}}  # type: ignore
    # every route is public, needs a role's permission, or is the agents' own (their token)
    assert app_routes == set(ROUTES) | PUBLIC | AGENT_PLANE
    assert all(p.startswith("/admin/") for (_, p), perm in ROUTES.items() if perm != "serve")


ROLES_KEYS = {"none": None, "unknown": UNKNOWN_KEY, "tenant": TENANT_KEY, "operator": OPERATOR_KEY,
              "admin": ADMIN_TOKEN}


@pytest.mark.parametrize("role", list(ROLES_KEYS))
@pytest.mark.parametrize(("method", "path"), sorted(AGENT_PLANE))
def test_no_role_opens_the_agents_routes(gs: GatewayServer, method: str, path: str, role: str) -> None:
    body = {"node": "intruder", "url": "http://127.0.0.2:1", "boot_id": "b"}
    r = httpx.request(method, gs.url + path, headers=auth(ROLES_KEYS[role]), json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_agent_token", r.text


@pytest.mark.parametrize("role", list(ROLES_KEYS))
@pytest.mark.parametrize(("method", "path"), sorted(ROUTES))
def test_every_route_against_every_role(gs: GatewayServer, method: str, path: str, role: str) -> None:
    r = call(gs, method, path, ROLES_KEYS[role])
    permission = ROUTES[(method, path)]
    may = role in PERMISSIONS and permission in PERMISSIONS[role]
    if may:
        assert r.status_code not in (401, 403), r.text
        return
    # refused: OpenAI's error shape; 401 for no key, an unknown one or a key of the other plane (a tenant key is
    # no admin credential, an admin or operator key is no API key), 403 for a role that lacks the permission
    expected = 403 if role in ("operator", "admin") and path.startswith("/admin/") else 401
    assert r.status_code == expected, r.text
    err = r.json()["error"]
    assert err["type"] == {401: "authentication_error", 403: "permission_error"}[expected]
    assert err["code"] == {401: "invalid_admin_token" if path.startswith("/admin/") else "invalid_api_key",
                           403: "insufficient_role"}[expected]


def test_tenant_keys_never_reach_admin(gs: GatewayServer) -> None:
    for key in (TENANT_KEY, OTHER_TENANT_KEY, FILE_KEY_V1):
        assert httpx.get(gs.url + "/v1/models", headers=auth(key), timeout=10).status_code == 200
        for method, path in ROUTES:
            if path.startswith("/admin/"):
                assert call(gs, method, path, key).status_code == 401


# ---------------------------------------------------------------------------------------------- key storage


def _strings(obj: Any, seen: set[int], depth: int = 0) -> Iterator[str]:
    """Every string reachable from `obj` through containers, dataclasses and plain objects (bounded depth)."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, str | bytes):
        yield obj if isinstance(obj, str) else obj.decode("latin-1")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, seen, depth + 1)
            yield from _strings(v, seen, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from _strings(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("live.", "core.")):
        yield from _strings(vars(obj), seen, depth + 1)
    if hasattr(obj, "__slots__") and type(obj).__module__.startswith(("live.", "core.")):
        for name in obj.__slots__:
            yield from _strings(getattr(obj, name, None), seen, depth + 1)


def test_keys_are_held_as_hashes_only(gs: GatewayServer) -> None:
    gw = gs.gateway
    found = "\n".join([repr(gw.config), repr(vars(gw.config)), repr(gw.keys), repr(vars(gw.keys)),
                       *_strings(gw.config, set()), *_strings(gw.keys, set())])
    for key in (TENANT_KEY, OTHER_TENANT_KEY, OPERATOR_KEY, ADMIN_TOKEN, FILE_KEY_V1):
        assert key not in found
        assert hash_key(key) in found  # what is held instead
    assert gw.config.admin_token.startswith("sha256:") and all(k.startswith("sha256:") for k in gw.config.tenants)
    # the stored form is accepted as config, never as a key: a hash is no credential
    assert Gateway(gw.config).keys.lookup(TENANT_KEY) is not None
    r = httpx.get(gs.url + "/v1/models", headers=auth(next(iter(gw.config.tenants))), timeout=10)
    assert r.status_code == 401


def test_lookup_compares_every_stored_hash_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore([Principal(f"t{i}", "tenant", (), hash_key(f"key-{i}")) for i in range(5)])
    calls: list[tuple[bytes, bytes]] = []
    real = gateway_auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway_auth.hmac, "compare_digest", counting)
    for key, name in (("key-0", "t0"), ("key-4", "t4"), ("wrong", None)):
        calls.clear()
        p = store.lookup(key)
        assert (p.name if p else None) == name
        assert len(calls) == 5  # every hash, whether or where it matched


def test_a_bad_keys_file_names_the_file_and_entry_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("principals:\n  - {name: ok, role: tenant, key: sk-fine-1}\n"
                    "  - {name: eve, role: root, key: sk-secret-do-not-print}\n")
    with pytest.raises(ValueError) as e:
        load_keys_file(path)
    assert str(path) in str(e.value) and "entry 1" in str(e.value) and "'eve'" in str(e.value)
    assert "sk-secret-do-not-print" not in str(e.value)
    with pytest.raises(ValueError, match="keys_file"):
        static_config(keys_file=str(tmp_path / "missing.yaml"))
    entry = f"- {{name: h, role: admin, key: 'sha256:{hash_key('x')}'}}"
    prehashed = load_keys_file(_write(tmp_path / "k.yaml", entry))
    assert prehashed[0].digest == hash_key("x")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- rotation


def _wait_status(url: str, key: str, status: int, within_s: float = 5.0) -> float:
    """Seconds until GET `url` with `key` answers `status` (fails after `within_s`)."""
    t0 = time.monotonic()
    while True:
        got = httpx.get(url, headers=auth(key), timeout=10).status_code
        if got == status:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within_s, f"still {got}, not {status}, after {within_s} s"
        time.sleep(0.05)


def test_keys_file_rotation_without_restart(null_engines: StartEngine, tmp_path: Path) -> None:
    keys_file, audit_path = tmp_path / "keys.json", tmp_path / "audit.jsonl"
    write_keys(keys_file, carol(FILE_KEY_V1))
    gw = Gateway(static_config(keys_file=str(keys_file), audit_log=str(audit_path), tick=False))
    with serving(gw) as served:
        models = served.url + "/v1/models"
        assert httpx.get(models, headers=auth(FILE_KEY_V1), timeout=10).status_code == 200
        write_keys(keys_file, carol(FILE_KEY_V2))
        assert _wait_status(models, FILE_KEY_V1, 401) < 2.5  # checked at most once a second
        assert httpx.get(models, headers=auth(FILE_KEY_V2), timeout=10).status_code == 200
        # a bad version is reported and the previous keys stay
        write_keys(keys_file, carol(FILE_KEY_V1), {"name": "mallory", "role": "superuser", "key": "sk-m"})
        deadline = time.monotonic() + 5
        while not gw.keys.reload_error and time.monotonic() < deadline:
            httpx.get(models, headers=auth(FILE_KEY_V2), timeout=10)
            time.sleep(0.1)
        assert str(keys_file) in gw.keys.reload_error and "entry 1" in gw.keys.reload_error
        assert httpx.get(models, headers=auth(FILE_KEY_V2), timeout=10).status_code == 200
        assert httpx.get(models, headers=auth(FILE_KEY_V1), timeout=10).status_code == 401
        listed = httpx.get(served.url + "/admin/keys", headers=auth(ADMIN_TOKEN), timeout=10).json()
        assert "entry 1" in listed["keys_file"]["error"]
        assert any(k["name"] == "carol" and k["source"] == "file" for k in listed["keys"])
        time.sleep(0.3)  # the reload entries are written in the background
    reloads = [e for e in read_entries(audit_path) if e["action"] == "keys.reload"]
    assert [e["outcome"] for e in reloads][:1] == ["ok"] and reloads[-1]["outcome"].startswith("error: ")
    assert reloads[0]["details"]["added"] == [hash_key(FILE_KEY_V2)[:16]]
    assert verify(audit_path).ok


def test_keys_added_and_revoked_through_the_admin_api(gs: GatewayServer) -> None:
    url = gs.url + "/admin/keys"
    r = httpx.post(url, headers=auth(ADMIN_TOKEN), json={"name": "dave", "role": "tenant", "models": [MODEL]},
                   timeout=10)
    assert r.status_code == 201, r.text
    new = r.json()
    key, key_id = new["key"], new["key_id"]
    assert key_id == hash_key(key)[:16] and len(key) > 40
    assert httpx.get(gs.url + "/v1/models", headers=auth(key), timeout=10).status_code == 200
    assert key not in httpx.get(url, headers=auth(ADMIN_TOKEN), timeout=10).text
    # its requests are counted under its name in /metrics (not as an unknown tenant)
    r = httpx.post(gs.url + "/v1/chat/completions", headers=auth(key), timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    for _ in range(50):  # the record row lands just after the answer
        if 'tenant="dave"' in (text := httpx.get(gs.url + "/metrics", timeout=10).text):
            break
        time.sleep(0.1)
    assert f'tierlab_requests_total{{model="{MODEL}",outcome="completed",tenant="dave"}} 1.0' in text, text[:3000]
    # an operator may neither add nor revoke
    assert httpx.post(url, headers=auth(OPERATOR_KEY), json={"name": "x", "role": "admin"}, timeout=10
                      ).status_code == 403
    assert httpx.delete(f"{url}/{key_id}", headers=auth(OPERATOR_KEY), timeout=10).status_code == 403
    r = httpx.delete(f"{url}/{key_id}", headers=auth(ADMIN_TOKEN), timeout=10)
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert httpx.get(gs.url + "/v1/models", headers=auth(key), timeout=10).status_code == 401
    assert httpx.delete(f"{url}/{key_id}", headers=auth(ADMIN_TOKEN), timeout=10).status_code == 404
    # a pre-hashed key: the admin never sends the key itself
    r = httpx.post(url, headers=auth(ADMIN_TOKEN), json={"name": "ops2", "role": "operator",
                                                          "sha256": hash_key("op-two-9d8e")}, timeout=10)
    assert r.status_code == 201 and "key" not in r.json()
    assert httpx.get(gs.url + "/admin/records", headers=auth("op-two-9d8e"), timeout=10).status_code == 200
    assert httpx.post(url, headers=auth(ADMIN_TOKEN), json={"name": "again", "role": "operator",
                                                             "sha256": hash_key("op-two-9d8e")}, timeout=10
                      ).status_code == 409
    # a key sent where a key_id goes is refused without being echoed
    r = httpx.delete(f"{url}/{TENANT_KEY}", headers=auth(ADMIN_TOKEN), timeout=10)
    assert r.status_code == 400 and TENANT_KEY not in r.text


def test_revoking_a_configured_key(null_engines: StartEngine) -> None:
    gw = Gateway(static_config(tick=False))
    with serving(gw) as served:
        key_id = hash_key(OTHER_TENANT_KEY)[:16]
        assert httpx.delete(f"{served.url}/admin/keys/{key_id}", headers=auth(ADMIN_TOKEN), timeout=10
                            ).status_code == 200
        assert httpx.get(served.url + "/v1/models", headers=auth(OTHER_TENANT_KEY), timeout=10).status_code == 401
        assert httpx.get(served.url + "/v1/models", headers=auth(TENANT_KEY), timeout=10).status_code == 200


# ---------------------------------------------------------------------------------------------- tier moves


def test_operator_moves_tiers_on_a_real_agent(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    params = generate_checkpoint(tmp_path / "spec", "tiny", 0).params  # the real size, for the tier's room
    with cluster(tmp_path, ("n0",), principals=[dict(OPERATOR)], audit_log=str(audit_path), tick=False,
                 models={MODEL: model_spec(MODEL, params, 4)}) as c:
        url, op = c.gs.url, auth(OPERATOR_KEY)
        body = {"node": "n0", "model": MODEL, "to_tier": "dram"}
        assert httpx.post(url + "/admin/tiers/copy", headers=auth(TENANT_KEY), json=body, timeout=60
                          ).status_code == 401
        r = httpx.post(url + "/admin/tiers/copy", headers=op, json=body, timeout=120)
        assert r.status_code == 200, r.text
        row = r.json()["action"]
        assert (row["kind"], row["detail"], row["outcome"]) == ("copy", "operator", "done")
        assert any((tmp_path / "n0-dram").rglob("*.safetensors"))  # the agent really holds it
        assert c.gs.gateway.state.nodes["n0"].tiers["dram"].holds(MODEL)
        again = httpx.post(url + "/admin/tiers/copy", headers=op, json=body, timeout=60)
        assert again.status_code == 409 and again.json()["action"]["reason"] == "already_held"
        evict = {"node": "n0", "model": MODEL, "tier": "dram"}
        r = httpx.post(url + "/admin/tiers/evict", headers=op, json=evict, timeout=60)
        assert r.status_code == 200 and r.json()["action"]["outcome"] == "done", r.text
        assert not any((tmp_path / "n0-dram").rglob("*.safetensors"))
        assert httpx.post(url + "/admin/tiers/evict", headers=op, json=evict, timeout=60).status_code == 409
        bad = httpx.post(url + "/admin/tiers/copy", headers=op, json={**body, "model": "../x"}, timeout=10)
        assert bad.status_code == 400
        actions = c.gs.gateway.actions()
        assert list(actions[actions["detail"] == "operator"]["outcome"]) == ["done", "skipped", "done", "skipped"]
    entries = read_entries(audit_path)
    moves = [(e["actor"], e["action"], e["outcome"]) for e in entries if e["action"].startswith("tiers.")]
    assert moves[0] == ("tenant:alice", "tiers.copy", "denied")
    assert moves[1:] == [("operator:ops", "tiers.copy", "ok"), ("operator:ops", "tiers.copy", "skipped: already_held"),
                         ("operator:ops", "tiers.evict", "ok"), ("operator:ops", "tiers.evict", "skipped: not_held"),
                         ("operator:ops", "tiers.copy", "error: 400 invalid_model_name")]
    assert entries[1]["target"] == f"n0/{MODEL} -> dram"
    assert verify(audit_path).ok


# ---------------------------------------------------------------------------------------------- audit


def test_every_admin_call_is_audited_and_the_chain_verifies(null_engines: StartEngine, tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    gw = Gateway(static_config(principals=[dict(OPERATOR)], audit_log=str(audit_path), tick=False))
    made: list[tuple[str, str, str]] = []  # (actor, action, outcome) expected, in order
    with serving(gw) as served:
        def hit(method: str, path: str, key: str | None, actor: str, action: str, outcome: str, **kw: Any) -> None:
            httpx.request(method, served.url + path, headers=auth(key), timeout=10, **kw)
            made.append((actor, action, outcome))

        hit("GET", "/admin/records", None, "anonymous", "records.read", "denied")
        hit("GET", "/admin/records", UNKNOWN_KEY, "anonymous", "records.read", "denied")
        hit("GET", "/admin/actions", TENANT_KEY, "tenant:alice", "actions.read", "denied")
        hit("GET", "/admin/records", OPERATOR_KEY, "operator:ops", "records.read", "ok")
        hit("GET", "/admin/actions", ADMIN_TOKEN, "admin:admin", "actions.read", "ok")
        hit("GET", "/admin/keys", OPERATOR_KEY, "operator:ops", "keys.list", "denied")
        hit("POST", "/admin/keys", ADMIN_TOKEN, "admin:admin", "keys.add", "ok",
            json={"name": "eve", "role": "operator"})
        hit("POST", "/admin/keys", ADMIN_TOKEN, "admin:admin", "keys.add", "error: 400 invalid_value",
            json={"name": "eve", "role": "operator", "models": [MODEL]})
        hit("DELETE", "/admin/keys/0123456789abcdef", ADMIN_TOKEN, "admin:admin", "keys.revoke",
            "error: 404 key_not_found")
        hit("POST", "/admin/tiers/evict", OPERATOR_KEY, "operator:ops", "tiers.evict", "skipped: no_agent (an "
            "adopted-only node: nothing can be loaded or moved there)", json={"node": "s0", "model": MODEL,
                                                                                "tier": "dram"})
        hit("GET", "/admin/audit", OPERATOR_KEY, "operator:ops", "audit.read", "ok")
        httpx.get(served.url + "/v1/models", headers=auth(TENANT_KEY), timeout=10)  # serving: not audited
        r = httpx.get(served.url + "/admin/audit", headers=auth(ADMIN_TOKEN), timeout=10)
        made.append(("admin:admin", "audit.read", "ok"))
        answer = r.json()
        assert answer["verdict"]["ok"] and answer["path"] == str(audit_path)
        assert len(answer["entries"]) == len(made) - 1  # all but this read, written once it is answered
    entries = read_entries(audit_path)
    assert [(e["actor"], e["action"], e["outcome"]) for e in entries] == made  # serving is not audited
    added = entries[6]
    assert added["details"]["generated"] is True and added["target"] == added["details"]["fingerprint"]
    assert all(e["details"]["status"] in (200, 201, 400, 401, 403, 404, 409) for e in entries)
    assert verify(audit_path).ok
    cli = subprocess.run([sys.executable, "-m", "live.audit", "verify", str(audit_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "chain intact" in cli.stdout
    lines = audit_path.read_text().splitlines()  # tampering: an edited outcome breaks the chain there
    lines[3] = lines[3].replace('"outcome":"ok"', '"outcome":"denied"')
    audit_path.write_text("\n".join(lines) + "\n")
    assert verify(audit_path).bad_line == 4


# ---------------------------------------------------------------------------------------------- no secret anywhere


def test_no_key_appears_in_any_output(gs: GatewayServer, caplog: pytest.LogCaptureFixture) -> None:
    gw, url = gs.gateway, gs.url
    secrets = [TENANT_KEY, OTHER_TENANT_KEY, OPERATOR_KEY, ADMIN_TOKEN, FILE_KEY_V1, UNKNOWN_KEY]
    caplog.set_level(logging.DEBUG)
    r = httpx.post(url + "/admin/keys", headers=auth(ADMIN_TOKEN), json={"name": "gen", "role": "tenant",
                                                                          "models": [MODEL]}, timeout=10)
    secrets.append(r.json()["key"])
    outputs: list[str] = []
    for key in list(secrets):  # every key on every route, allowed or not, good requests and bad ones
        for method, path in sorted(ROUTES):
            r = call(gs, method, path, key)
            if r.status_code == 201:  # a generated key, answered this once: one more secret to look for
                secrets.append(r.json()["key"])
            else:
                outputs.append(r.text)
        httpx.post(url + "/v1/chat/completions", headers=auth(key), json={**chat(), "max_tokens": -1}, timeout=10)
        httpx.post(url + "/v1/completions", headers=auth(key), content=b"{not json", timeout=10)
    records = gw.records()
    buf = io.StringIO()
    records.to_csv(buf, quoting=csv.QUOTE_ALL)
    time.sleep(0.2)
    assert gw.audit is not None
    texts = {
        "records": buf.getvalue(),
        "actions": httpx.get(url + "/admin/actions", headers=auth(ADMIN_TOKEN), timeout=10).text,
        "admin/records": httpx.get(url + "/admin/records", headers=auth(ADMIN_TOKEN), timeout=10).text,
        "admin/audit": httpx.get(url + "/admin/audit", headers=auth(ADMIN_TOKEN), timeout=10).text,
        "audit file": gw.audit.path.read_text(),
        "metrics": httpx.get(url + "/metrics", timeout=10).text,
        "instances": gw.instance_events().to_csv(),
        "logs": caplog.text + "\n".join(repr(rec.__dict__) for rec in caplog.records),
        # the answers, but those that handed out a generated key
        "answers": "\n".join(outputs),
    }
    assert len(records) > 0 and len(texts["audit file"].splitlines()) > len(secrets)
    for where, text in texts.items():
        for key in secrets:
            assert key not in text, f"a key appears in {where}"
