"""The gateway's /admin endpoints: each checks the caller's role against `live.gateway_auth.ROUTES`, and every
call, refused ones included, leaves one entry in the audit log (`live.audit`, `GatewayConfig.audit_log`).

    GET    /admin/records          request records (operator, admin)
    GET    /admin/actions          policy (and operator) actions carried out (operator, admin)
    GET    /admin/audit            the audit log's last entries and the verdict on its hash chain (operator, admin)
    POST   /admin/tiers/copy       {node, model, to_tier}: copy a model into a tier, through the gateway's own
                                   action machinery (`core.decisions.Copy`); answers the action's record row
    POST   /admin/tiers/evict      {node, model, tier}: drop a model from a tier (`core.decisions.Evict`)
    GET    /admin/keys             the valid keys by fingerprint (admin)
    POST   /admin/keys             {name, role, models?, sha256?}: add a key (generated and answered once if no
                                   sha256 is given); in memory until restart (admin)
    DELETE /admin/keys/{key_id}    revoke a key, whichever source lists it, until restart (admin)

No key, an unknown key or a tenant key is a 401 (`invalid_admin_token`: a tenant key is no admin credential, and
says nothing more); an operator key on a key-management endpoint is a 403 (`insufficient_role`). Audit entries
name the actor (`role:name`, or "anonymous"), the action, its target and outcome, with details that never hold a
request's contents nor a key (keys appear as their fingerprint only).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.decisions import Copy, Evict
from live.audit import read_entries, verify
from live.gateway_actions import ACTION_COLUMNS
from live.gateway_api import ApiError, bearer, parse_body, read_body, safe_model_name
from live.gateway_auth import KEY_ID_LEN, ROLES, ROUTES, Principal, allowed, hash_key, principal_from
from live.gateway_mirror import log
from live.gateway_records import records_json

if TYPE_CHECKING:
    from live.gateway import Gateway

AUDIT_TAIL = 1000  # GET /admin/audit answers at most this many entries (the last ones); `verify` reads them all
OPERATOR_KIND = "operator"  # the `detail` of an operator's tier move in Gateway.actions()
KEY_ID_RE = re.compile(rf"^[0-9a-f]{{{KEY_ID_LEN}}}$")
MOVE_WAIT_S = 35.0  # on top of load_timeout_s: an operator's copy also waits for evictions under way (30 s each)

Handler = Callable[[Request, Principal, dict[str, Any]], Awaitable[Response]]


async def audit(gateway: Gateway, action: str, target: str, outcome: str, actor: str,
                details: dict[str, Any]) -> None:
    """Append one entry to the gateway's audit log (off the event loop: it fsyncs); a failure is logged, never
    raised (the gateway serves on)."""
    if gateway.audit is None:
        return
    try:
        await asyncio.to_thread(gateway.audit.append, action, target, outcome, actor=actor, details=details)
    except Exception:
        log.exception("audit log %s: the entry for %s was not written", gateway.audit.path, action)


def guarded(gateway: Gateway, method: str, path: str, action: str, handler: Handler) -> Callable[..., Any]:
    """An endpoint that lets only a role holding ROUTES[(method, path)] through to `handler`, and audits the call.

    `handler(request, principal, facts)` may set facts["target"], facts["outcome"] and add facts["details"]."""
    permission = ROUTES[(method, path)]

    async def endpoint(request: Request) -> Response:
        principal = gateway.keys.lookup(bearer(request))
        facts: dict[str, Any] = {"target": path, "details": {}}
        if principal is None or principal.role == "tenant":
            why = "no key" if not bearer(request) else "tenant key" if principal is not None else "unknown key"
            await audit(gateway, action, path, "denied", principal.actor if principal else "anonymous",
                        {"status": 401, "reason": why})
            return ApiError(401, "missing or invalid admin or operator key (Authorization: Bearer <key>)",
                            "invalid_admin_token").response()
        if not allowed(principal.role, permission):
            await audit(gateway, action, path, "denied", principal.actor,
                        {"status": 403, "reason": f"role {principal.role} lacks {permission}"})
            return ApiError(403, f"the {principal.role} role may not {permission} ({method} {path})",
                            "insufficient_role").response()
        try:
            response = await handler(request, principal, facts)
            outcome = facts.get("outcome") or ("ok" if response.status_code < 400 else f"error: "
                                                                                        f"{response.status_code}")
        except ApiError as e:
            response, outcome = e.response(), f"error: {e.status} {e.code}"
        except Exception as e:  # a bug answers 500 and is audited, the gateway serves on
            log.exception("%s %s failed", method, path)
            response = ApiError(500, f"internal error: {type(e).__name__}", "internal_error").response()
            outcome = f"error: internal {type(e).__name__}"
        await audit(gateway, action, str(facts["target"]), outcome, principal.actor,
                    {"status": response.status_code, **facts["details"]})
        return response

    return endpoint


async def _json_object(gateway: Gateway, request: Request, fields: dict[str, type], optional: tuple[str, ...] = ()
                       ) -> dict[str, Any]:
    """The request's JSON object with exactly `fields` (each of its type) and maybe `optional` ones; 400 else."""
    body = parse_body(await read_body(request, gateway.config.max_body_bytes))
    unknown = sorted(set(body) - set(fields) - set(optional))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; known: {sorted({*fields, *optional})}", "unknown_parameter",
                       unknown[0])
    for name, kind in fields.items():
        if name not in body and name not in optional:
            raise ApiError(400, f"you must provide a '{name}' parameter", "missing_required_parameter", name)
        if name in body and (not isinstance(body[name], kind) or isinstance(body[name], bool)):
            raise ApiError(400, f"'{name}' must be a {kind.__name__}", "invalid_type", name)
    return body


# ---------------------------------------------------------------------------------------------- reads


def _reads(gateway: Gateway) -> list[Route]:
    async def records(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        # a long run has many rows: build the JSON off the event loop (records() copies the row lists first)
        return JSONResponse(await asyncio.to_thread(lambda: records_json(gateway.records())))

    async def actions(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        return JSONResponse(await asyncio.to_thread(lambda: records_json(gateway.actions())))

    async def audit_log(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        if gateway.audit is None:
            return JSONResponse({"path": None, "entries": [], "verdict": {"ok": True, "entries": 0, "bad_line": None,
                                                                          "problem": ""}})
        path = gateway.audit.path

        def read() -> dict[str, Any]:
            if not path.exists():
                return {"path": str(path), "entries": [], "verdict": {"ok": True, "entries": 0, "bad_line": None,
                                                                      "problem": ""}}
            v = verify(path)
            entries = read_entries(path) if v.ok else []
            return {"path": str(path), "entries": entries[-AUDIT_TAIL:],
                    "verdict": {"ok": v.ok, "entries": v.entries, "bad_line": v.bad_line, "problem": v.problem}}

        return JSONResponse(await asyncio.to_thread(read))

    return [
        Route("/admin/records", guarded(gateway, "GET", "/admin/records", "records.read", records)),
        Route("/admin/actions", guarded(gateway, "GET", "/admin/actions", "actions.read", actions)),
        Route("/admin/audit", guarded(gateway, "GET", "/admin/audit", "audit.read", audit_log)),
    ]


# ---------------------------------------------------------------------------------------------- tier moves


async def move(gateway: Gateway, action: Copy | Evict) -> dict[str, Any]:
    """Carry out an operator's `action` with the gateway's own machinery (`Gateway.execute`: the mirror reserves
    or frees the room, the agent copies or evicts), wait for it, and return its row of `Gateway.actions()` (outcome
    "running" if it has not ended within the load timeout)."""
    kind, tier = ("copy", action.to_tier) if isinstance(action, Copy) else ("evict", action.tier)
    seen = len(gateway._actions)
    before = set(gateway._tasks)
    gateway.execute([action])  # records a skip at once, or spawns the agent's work
    started = set(gateway._tasks) - before
    if started:
        await asyncio.wait(started, timeout=gateway.config.load_timeout_s + MOVE_WAIT_S)
    for row in reversed(gateway._actions[seen:]):
        got = dict(zip(ACTION_COLUMNS, row, strict=True))
        if (got["kind"], got["detail"], got["model"], got["node"], got["tier"]) == (
                kind, OPERATOR_KIND, action.model, action.node, tier):
            return got
    return {c: None for c in ACTION_COLUMNS} | {"kind": kind, "detail": OPERATOR_KIND, "model": action.model,
                                                 "node": action.node, "tier": tier, "outcome": "running"}


_MOVE_STATUS = {"done": 200, "running": 202, "skipped": 409, "failed": 502}


def _moves(gateway: Gateway) -> list[Route]:
    async def answer(action: Copy | Evict, facts: dict[str, Any]) -> Response:
        if not safe_model_name(action.model):
            raise ApiError(400, f"invalid model name {action.model!r}", "invalid_model_name", "model")
        row = await move(gateway, action)
        facts["outcome"] = "ok" if row["outcome"] == "done" else f"{row['outcome']}: {row['reason']}"[:300]
        facts["details"] = {"action_outcome": row["outcome"], "duration_s": row["duration_s"]}
        return JSONResponse({"action": row}, status_code=_MOVE_STATUS.get(str(row["outcome"]), 200))

    async def copy(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        body = await _json_object(gateway, request, {"node": str, "model": str, "to_tier": str})
        facts["target"] = f"{body['node']}/{body['model']} -> {body['to_tier']}"
        return await answer(Copy(body["model"], body["node"], body["to_tier"], kind=OPERATOR_KIND), facts)

    async def evict(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        body = await _json_object(gateway, request, {"node": str, "model": str, "tier": str})
        facts["target"] = f"{body['node']}/{body['model']} @ {body['tier']}"
        return await answer(Evict(body["model"], body["node"], body["tier"], kind=OPERATOR_KIND), facts)

    return [
        Route("/admin/tiers/copy", guarded(gateway, "POST", "/admin/tiers/copy", "tiers.copy", copy),
              methods=["POST"]),
        Route("/admin/tiers/evict", guarded(gateway, "POST", "/admin/tiers/evict", "tiers.evict", evict),
              methods=["POST"]),
    ]


# ---------------------------------------------------------------------------------------------- keys


def _keys(gateway: Gateway) -> list[Route]:
    store = gateway.keys

    async def list_keys(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        return JSONResponse({"keys": [p.public() for p in store.principals()],
                             "keys_file": {"path": str(store.keys_file) if store.keys_file else None,
                                           "error": store.reload_error}})

    async def add_key(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        body = await _json_object(gateway, request, {"name": str, "role": str, "models": list, "sha256": str},
                                  optional=("models", "sha256"))
        if body["role"] not in ROLES:
            raise ApiError(400, f"'role' must be one of {list(ROLES)}", "invalid_value", "role")
        key = None if "sha256" in body else "sk-" + secrets.token_urlsafe(32)  # 256 random bits
        entry = {k: body[k] for k in ("name", "role", "models") if k in body}
        entry["sha256"] = body["sha256"] if key is None else hash_key(key)
        try:
            new = principal_from(entry, "POST /admin/keys", "api", set(gateway.config.models))
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value") from None
        facts["target"] = new.key_id
        facts["details"] = {"fingerprint": new.key_id, "name": new.name, "role": new.role, "models": list(new.models),
                            "generated": key is not None}
        try:
            store.add(new)
        except ValueError as e:
            raise ApiError(409, str(e), "key_exists") from None
        # the one time a generated key is shown: it is stored as its hash only
        return JSONResponse({**new.public(), **({"key": key} if key else {})}, status_code=201)

    async def revoke_key(request: Request, principal: Principal, facts: dict[str, Any]) -> Response:
        key_id = request.path_params["key_id"]
        if not KEY_ID_RE.match(key_id):  # never echo or audit it: it might be a key sent by mistake
            facts["target"] = "(not a key_id)"
            raise ApiError(400, f"a key_id is {KEY_ID_LEN} hex digits (GET /admin/keys)", "invalid_value", "key_id")
        facts["target"] = key_id
        gone = store.revoke(key_id)
        if gone is None:
            raise ApiError(404, f"no valid key has key_id {key_id}", "key_not_found", "key_id")
        facts["details"] = {"fingerprint": key_id, "name": gone.name, "role": gone.role, "source": gone.source}
        return JSONResponse({**gone.public(), "revoked": True})

    return [
        Route("/admin/keys", by_method(GET=guarded(gateway, "GET", "/admin/keys", "keys.list", list_keys),
                                       POST=guarded(gateway, "POST", "/admin/keys", "keys.add", add_key)),
              methods=["GET", "POST"]),
        Route("/admin/keys/{key_id}", guarded(gateway, "DELETE", "/admin/keys/{key_id}", "keys.revoke", revoke_key),
              methods=["DELETE"]),
    ]


def by_method(**endpoints: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """One endpoint for a path whose methods have their own (the route allows only those methods)."""

    async def endpoint(request: Request) -> Response:
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


def admin_routes(gateway: Gateway) -> list[Route]:
    """Every /admin route of `gateway`."""
    return [*_reads(gateway), *_moves(gateway), *_keys(gateway)]
