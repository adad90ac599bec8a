"""Who may call what on the gateway: principals (a key's owner and its role), the permission table, and the key
store that authenticates a bearer key without keeping any key in plain text.

Roles and what each may do (`PERMISSIONS`, the one place this is decided; `ROUTES` maps each endpoint to the
permission it needs):

    tenant    serve: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (its own models only)
    operator  read records, actions and the audit log; move models between tiers (POST /admin/tiers/*)
    admin     everything an operator may do, and manage keys (GET/POST /admin/keys, DELETE /admin/keys/{key_id})

Serving is for tenant keys only: an admin or operator key is not an API key (an operator who also needs to serve
is given a tenant key of its own), and a tenant key never opens an /admin endpoint.

Keys are stored as their sha256 (hex). API keys are long random strings (`secrets.token_urlsafe(32)`: 256 bits),
not passwords, so a fast unsalted hash is the standard choice (as GitHub and Stripe store their tokens): nothing
can be guessed from the hash, and a salt or a slow hash would only make every request pay. A presented key is
hashed and compared with `hmac.compare_digest` against every stored hash (no dict lookup keyed by the key, no early
exit), so the time taken does not tell how much of a key was right. A key is named by its fingerprint, `key_id`
(the first 16 hex digits of its hash), never by itself.

Keys come from the config (`tenants`, `admin_token`, `principals`), from an optional keys file (re-read when it
changes, checked at most once a second on the request path: rotation without a restart) and from POST /admin/keys
(held in memory only). A revoked key (DELETE /admin/keys/{key_id}) stays revoked until the gateway restarts,
whichever source lists it.

Keys file (JSON or YAML): a list of entries, or `{"principals": [...]}`; an entry is
`{name, role: admin|operator|tenant, models: [...] (tenants), key: <plain key> | sha256: <hex>}` (`key` may also
be written `sha256:<hex>`: the pre-hashed form, so that the file need not hold any key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from live.gateway_api import Tenant

log = logging.getLogger("live.gateway")

ROLES = ("admin", "operator", "tenant")
_OPERATOR = frozenset({"records.read", "actions.read", "audit.read", "tiers.move"})
#: role -> the permissions it holds.
PERMISSIONS: Mapping[str, frozenset[str]] = {
    "tenant": frozenset({"serve"}),
    "operator": _OPERATOR,
    "admin": _OPERATOR | {"keys.manage"},
}
#: (method, route path) -> the permission it needs; routes not listed (/healthz, /metrics, /openapi.json) are public.
ROUTES: Mapping[tuple[str, str], str] = {
    ("POST", "/v1/chat/completions"): "serve",
    ("POST", "/v1/completions"): "serve",
    ("GET", "/v1/models"): "serve",
    ("GET", "/admin/records"): "records.read",
    ("GET", "/admin/actions"): "actions.read",
    ("GET", "/admin/audit"): "audit.read",
    ("POST", "/admin/tiers/copy"): "tiers.move",
    ("POST", "/admin/tiers/evict"): "tiers.move",
    ("GET", "/admin/keys"): "keys.manage",
    ("POST", "/admin/keys"): "keys.manage",
    ("DELETE", "/admin/keys/{key_id}"): "keys.manage",
}
PREHASHED = "sha256:"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_LEN = 16
RELOAD_EVERY_S = 1.0
ENTRY_FIELDS = frozenset({"name", "role", "models", "key", "sha256"})


def allowed(role: str, permission: str) -> bool:
    """Whether `role` holds `permission` (an unknown role holds nothing)."""
    return permission in PERMISSIONS.get(role, frozenset())


def hash_key(key: str) -> str:
    """sha256 (hex) of a key: what is stored and compared."""
    return hashlib.sha256(key.encode()).hexdigest()


def stored_digest(key: str) -> str:
    """The stored hash of a configured key: `sha256:<hex>` is already one (lower-cased), anything else is hashed."""
    low = key.lower()
    if low.startswith(PREHASHED) and _HEX64.match(low[len(PREHASHED):]):
        return low[len(PREHASHED):]
    return hash_key(key)


@dataclass(frozen=True)
class Principal:
    """A key's owner: name, role, the models a tenant may call, the key's sha256 (never the key) and where it was
    configured (config, file or api)."""

    name: str
    role: str
    models: tuple[str, ...]
    digest: str
    source: str = "config"

    @property
    def key_id(self) -> str:
        """The key's fingerprint: how it is named in answers, logs and the audit log."""
        return self.digest[:KEY_ID_LEN]

    @property
    def actor(self) -> str:
        """`role:name`, as the audit log names who acted."""
        return f"{self.role}:{self.name}"

    @property
    def tenant(self) -> Tenant:
        return Tenant(self.name, self.models)

    def public(self) -> dict[str, Any]:
        """What GET /admin/keys shows of it (no hash beyond the fingerprint)."""
        return {"key_id": self.key_id, "name": self.name, "role": self.role, "models": list(self.models),
                "source": self.source}


def principal_from(entry: Any, where: str, source: str, served: Collection[str] | None = None) -> Principal:
    """A principal from a config / keys-file / API entry; ValueError naming `where` and the field (never the key).

    `served`: the models a tenant may be given (None: not checked)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: an entry must be a mapping with name, role, models and key or sha256")
    unknown = sorted(set(map(str, entry)) - ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(ENTRY_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    role = entry.get("role", "tenant")
    if role not in ROLES:
        raise ValueError(f"{where}: 'role' must be one of {list(ROLES)}, got {role!r}")
    models = entry.get("models") or []
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{where}: 'models' must be a list of model names")
    if role != "tenant" and models:
        raise ValueError(f"{where}: only tenants are given models (admin and operator keys do not serve)")
    if served is not None and set(models) - set(served):
        raise ValueError(f"{where}: models {sorted(set(models) - set(served))} are not served; served: "
                         f"{sorted(served)}")
    key, digest = entry.get("key"), entry.get("sha256")
    if (key is None) == (digest is None):
        raise ValueError(f"{where}: give exactly one of 'key' (plain, or sha256:<hex>) and 'sha256' (hex)")
    if digest is not None:
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise ValueError(f"{where}: 'sha256' must be 64 hex digits")
        digest = digest.lower()
    else:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: 'key' must be a non-empty string")
        digest = stored_digest(key)
    return Principal(name, str(role), tuple(models), digest, source)


def config_principals(tenants: Mapping[str, Tenant], admin_token: str,
                      principals: Iterable[Principal]) -> list[Principal]:
    """The principals of a `GatewayConfig`: each tenant key, the admin token (an admin named "admin") and the
    `principals` list. Keys already in `sha256:<hex>` form are taken as hashes."""
    out = [Principal(t.name, "tenant", tuple(t.models), stored_digest(k)) for k, t in tenants.items()]
    if admin_token:
        out.append(Principal("admin", "admin", (), stored_digest(admin_token)))
    return out + list(principals)


def load_keys_file(path: str | os.PathLike[str], served: Collection[str] | None = None) -> list[Principal]:
    """The principals of a keys file; ValueError naming the file and the entry (OSError if unreadable)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:  # its message gives the position only, never the text
            raise ValueError(f"keys file {path}: not valid JSON ({e})") from None
    else:  # YAML (a superset of JSON)
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # its message may quote the bad line, which could hold a key: the place only
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"keys file {path}: not valid YAML{at}") from None
    if isinstance(data, Mapping):
        data = data.get("principals")
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ValueError(f"keys file {path}: expected a list of entries (or {{principals: [...]}})")
    out = [principal_from(e, f"keys file {path}: entry {i}", "file", served) for i, e in enumerate(data)]
    _check_unique(out, f"keys file {path}")
    return out


def _check_unique(principals: Sequence[Principal], where: str) -> None:
    seen: dict[str, str] = {}
    for p in principals:
        if p.digest in seen:
            raise ValueError(f"{where}: {p.name!r} and {seen[p.digest]!r} have the same key (key_id {p.key_id})")
        seen[p.digest] = p.name


class KeyStore:
    """Authenticates bearer keys against hashed principals from the config, a keys file and the admin API.

    `on_reload(outcome, details)` is told of every re-read of the keys file ("ok" or "error: ..."), for the audit.
    """

    def __init__(self, static: Sequence[Principal], keys_file: str | os.PathLike[str] | None = None,
                 served: Collection[str] | None = None,
                 on_reload: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._static = list(static)
        self._file: list[Principal] = []
        self._api: list[Principal] = []
        self._revoked: set[str] = set()  # digests
        self.keys_file = Path(keys_file) if keys_file else None
        self.served = served
        self.on_reload = on_reload
        self.reload_error = ""  # the last failed re-read's reason ("" once one succeeds)
        self._clock = clock
        self._next_check = 0.0
        self._sig: tuple[int, int, int] | None = None
        if self.keys_file is not None:  # at start a bad file is an error, not a warning
            self._sig = self._stat()
            self._file = load_keys_file(self.keys_file, served)
            self._next_check = clock() + RELOAD_EVERY_S
        self._all: tuple[Principal, ...] = ()
        self._rebuild()

    def __repr__(self) -> str:
        return f"KeyStore({len(self._all)} keys, file={self.keys_file})"

    # ------------------------------------------------------------------ lookups

    def lookup(self, key: str) -> Principal | None:
        """The principal whose key is `key`, or None; every stored hash is compared (constant time each)."""
        self.maybe_reload()
        if not key:
            return None
        digest = hash_key(key).encode()
        found: Principal | None = None
        for p in self._all:
            if hmac.compare_digest(digest, p.digest.encode()) and found is None:
                found = p  # no break: the time taken does not depend on where (or whether) it matched
        return found

    def principals(self) -> list[Principal]:
        """Every principal whose key is valid now."""
        self.maybe_reload()
        return list(self._all)

    def find(self, key_id: str) -> Principal | None:
        """The principal of fingerprint `key_id` (valid now), or None."""
        return next((p for p in self._all if p.key_id == key_id), None)

    # ------------------------------------------------------------------ changes

    def add(self, principal: Principal) -> Principal:
        """Accept a key from the admin API (in memory: gone at restart); ValueError if the key or its fingerprint
        is already taken (revoked keys included: a revoked key is never given back)."""
        taken = {p.digest for p in (*self._static, *self._file, *self._api)} | self._revoked
        ids = {d[:KEY_ID_LEN] for d in taken}
        if principal.digest in taken or principal.key_id in ids:
            raise ValueError(f"key_id {principal.key_id} is already taken")
        self._api.append(principal)
        self._rebuild()
        return principal

    def revoke(self, key_id: str) -> Principal | None:
        """Revoke the key of fingerprint `key_id` (whichever source lists it) until restart; the principal, or
        None if no valid key has it."""
        p = self.find(key_id)
        if p is None:
            return None
        self._revoked.add(p.digest)
        self._api = [a for a in self._api if a.digest != p.digest]
        self._rebuild()
        return p

    def _rebuild(self) -> None:
        seen: set[str] = set()
        out = []
        for p in (*self._static, *self._file, *self._api):  # the first source listing a key wins
            if p.digest not in seen and p.digest not in self._revoked:
                seen.add(p.digest)
                out.append(p)
        self._all = tuple(out)

    # ------------------------------------------------------------------ the keys file

    def _stat(self) -> tuple[int, int, int]:
        assert self.keys_file is not None
        st = self.keys_file.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def maybe_reload(self) -> None:
        """Re-read the keys file if it changed; checked at most once per `RELOAD_EVERY_S` (a clock read otherwise).
        A file that cannot be read or is invalid is reported and the previous keys stay."""
        if self.keys_file is None or self._clock() < self._next_check:
            return
        self._next_check = self._clock() + RELOAD_EVERY_S
        try:
            sig = self._stat()
            if sig == self._sig:
                return
            self._sig = sig  # a bad version is reported once, not every second
            principals = load_keys_file(self.keys_file, self.served)
        except (OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}" if isinstance(e, ValueError) else f"cannot read {self.keys_file}: " \
                                                                                  f"{e.strerror}"
            self.reload_error = reason
            log.error("keys file not reloaded, the previous keys stay: %s", reason)
            self._tell(f"error: {reason}"[:500], {"file": str(self.keys_file)})
            return
        before = {p.digest for p in self._file}
        self._file = principals
        self.reload_error = ""
        self._rebuild()
        after = {p.digest for p in principals}
        log.info("keys file %s reloaded: %d keys (%d added, %d removed)", self.keys_file, len(principals),
                 len(after - before), len(before - after))
        self._tell("ok", {"file": str(self.keys_file), "entries": len(principals),
                          "added": sorted(d[:KEY_ID_LEN] for d in after - before),
                          "removed": sorted(d[:KEY_ID_LEN] for d in before - after)})

    def _tell(self, outcome: str, details: dict[str, Any]) -> None:
        if self.on_reload is not None:
            try:
                self.on_reload(outcome, details)
            except Exception:  # the audit failing must not stop authentication
                log.exception("keys file reload: the audit callback failed")
