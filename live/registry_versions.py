"""Model versions in the registry: content-addressed revisions, the alias that names the current one, and the
store key layout they share.

A revision is the first 16 hex digits of the sha256 of the manifest's canonical JSON, so the same files under
the same name are always the same revision and a manifest read back from a store can be checked against the
revision that named it. Users write `name@revision` to pin one, plain `name` for the alias's. A weight variant
of a deployment (`core.variants.variant_name`: `name@int8`, a `live.quantize` copy) is a model of its own, with
its own revisions (`name@int8@revision`); a variant's format never has the form of a revision id.

Key layout in every store (relative to the store root):

    <name>/<file>, <name>/tierlab_manifest.json            the in-place revision: the name's first publish
                                                           (the layout of checkpoints published before
                                                           versions existed, still read and written)
    <name>/.tierlab-revisions/<rev>/<file>, .../tierlab_manifest.json   every later revision
    <name>/.tierlab-alias.json                             the alias: current revision and the history of moves

The reserved names start with '.', and a manifest never lists a hidden file (`live.manifest`), so no checkpoint
file can collide with them. Every revision has its own keys: publishing one never writes a key another one
uses, so fetches and instances of the old revision are undisturbed. With no alias object, the in-place revision
is the current one (how every store looked before versions).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
from dataclasses import dataclass, field

from live.manifest import MANIFEST_FILE, Manifest
from live.stores import Store

REVISION_HEX = 16  # 64 bits of the sha256: collisions among one model's revisions are not a practical concern
REVISIONS_DIR = ".tierlab-revisions"
ALIAS_FILE = ".tierlab-alias.json"
ALIAS_HISTORY_MAX = 200  # moves kept in the alias object (it is rewritten whole on each move)
# letters, digits, '.', '_', '-'; starts with a letter or digit (so never '.', '..' or a hidden name)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REVISION_RE = re.compile(rf"^[0-9a-f]{{{REVISION_HEX}}}$")
# a weight format (core/variants.py: fp8, int8, int4, ...): a lowercase letter, then lowercase letters and digits
_VARIANT_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the model and, per store, what went wrong."""


def check_model_name(name: str) -> str:
    """`name` (`plain[@format][@revision]`) if safe as a single path component and object key; else ValueError.

    `@` separates a plain name from a weight variant's format (`name@int8`) and from a revision id (16 lowercase
    hex digits); the result stays a safe directory name, so agents keep one tier dir per pinned revision.
    """
    if isinstance(name, str) and 2 <= len(parts := name.split("@")) <= 3:
        check_model_name(parts[0])
        *variant, last = parts[1:]
        if variant or not _REVISION_RE.fullmatch(last):
            check_variant(variant[0] if variant else last, parts[0])
        if variant:
            check_revision(last, f"{parts[0]}@{variant[0]}")
        return name
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"unsafe model name {name!r}: use 1-128 of [A-Za-z0-9._-], starting with a letter or "
                         "digit, with no path separator and no '..' (then optionally '@' and a weight format, "
                         "and '@' and a revision id)")
    return name


def check_variant(fmt: str, model: str = "?") -> str:
    """`fmt` if it has the form of a weight format (`int8`, `fp8`, ...); ValueError naming the model otherwise."""
    if not _VARIANT_RE.fullmatch(fmt) or _REVISION_RE.fullmatch(fmt):
        raise ValueError(f"model {model!r}: {fmt!r} is neither a revision id ({REVISION_HEX} lowercase hex digits) "
                         "nor a weight format (a lowercase letter, then lowercase letters, digits and '_')")
    return fmt


def check_revision(rev: str, model: str = "?") -> str:
    """`rev` if it has the form of a revision id; ValueError naming the model otherwise."""
    if not isinstance(rev, str) or not _REVISION_RE.fullmatch(rev):
        raise ValueError(f"model {model!r}: {rev!r} is not a revision id ({REVISION_HEX} lowercase hex digits of "
                         "the manifest's sha256, as `versions` lists them)")
    return rev


def parse_ref(ref: str) -> tuple[str, str | None]:
    """(`name`, revision or None) of `name` or `name@revision`, both checked (`name` may be a variant,
    `base@format`)."""
    check_model_name(ref)
    name, _, last = ref.rpartition("@")
    if name and _REVISION_RE.fullmatch(last):
        return name, last
    return ref, None


def revision_of(manifest: Manifest) -> str:
    """The content address of `manifest`: sha256 of its canonical JSON (sorted keys, no whitespace), 16 hex."""
    canonical = json.dumps(json.loads(manifest.to_json()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_HEX]


# --- keys ----------------------------------------------------------------------------------------------------
def in_place_prefix(name: str) -> str:
    return name


def revision_prefix(name: str, rev: str) -> str:
    return f"{name}/{REVISIONS_DIR}/{rev}"


def manifest_key(prefix: str) -> str:
    return f"{prefix}/{MANIFEST_FILE}"


def alias_key(name: str) -> str:
    return f"{name}/{ALIAS_FILE}"


def revision_of_key(name: str, key: str) -> str | None:
    """The revision a key of `name`'s listing belongs to; "" for the in-place revision, None for the alias."""
    rest = key[len(name) + 1:] if key.startswith(f"{name}/") else key
    if rest == ALIAS_FILE:
        return None
    if rest.startswith(f"{REVISIONS_DIR}/"):
        return rest.split("/")[1]
    return ""


# --- alias ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: to `revision` from `previous` (None: the first), by `op` ("publish", "rollback")."""

    revision: str
    previous: str | None
    op: str
    time_unix: float
    by: str = ""


@dataclass(frozen=True)
class Alias:
    """A model's alias: the current revision, and the moves that led there (oldest first)."""

    model: str
    revision: str
    history: tuple[AliasMove, ...] = field(default_factory=tuple)

    def moved(self, rev: str, op: str, now_unix: float, by: str | None = None) -> Alias:
        """This alias moved to `rev`, the move appended to the history (the oldest moves dropped past the cap)."""
        move = AliasMove(rev, self.revision, op, now_unix, by if by is not None else _user())
        return Alias(self.model, rev, (*self.history, move)[-ALIAS_HISTORY_MAX:])

    @classmethod
    def first(cls, model: str, rev: str, previous: str | None, op: str, now_unix: float,
              by: str | None = None) -> Alias:
        """A new alias on `rev`; `previous` is the revision plain `model` meant before (the in-place one), if any."""
        return cls(model, rev, (AliasMove(rev, previous, op, now_unix, by if by is not None else _user()),))

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "revision": self.revision,
                           "history": [m.__dict__ for m in self.history]}, indent=1)

    @classmethod
    def from_json(cls, text: str, model: str) -> Alias:
        """Parse an alias object of `model`; ValueError naming the model and the field if it is malformed."""
        try:
            d = json.loads(text)
            alias = cls(str(d["model"]), check_revision(d["revision"], model),
                        tuple(AliasMove(str(m["revision"]), m.get("previous"), str(m["op"]), float(m["time_unix"]),
                                        str(m.get("by", ""))) for m in d.get("history", ())))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"model {model!r}: malformed alias object {ALIAS_FILE} ({type(e).__name__}: {e})") from e
        if alias.model != model:
            raise ValueError(f"model {model!r}: alias object {ALIAS_FILE} is for model {alias.model!r}")
        return alias


def _user() -> str:
    """Who moves an alias, for the history (best effort: no user database in a container is no error)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


# --- reading one store -----------------------------------------------------------------------------------------
def read_alias(store: Store, name: str) -> Alias | None:
    """`name`'s alias in `store`; None if it has none (ValueError if malformed, other errors as raised)."""
    try:
        text = store.get_bytes(alias_key(name))
    except FileNotFoundError:
        return None
    return Alias.from_json(text.decode(), name)


def read_manifest_at(store: Store, name: str, prefix: str) -> Manifest:
    """The manifest under `prefix` (FileNotFoundError if absent); ValueError if it is for another model."""
    m = Manifest.from_json(store.get_bytes(manifest_key(prefix)).decode())
    if m.model != name:
        raise ValueError(f"{store.url_of(manifest_key(prefix))}: manifest is for model {m.model!r}, not {name!r}")
    return m


def locate(store: Store, name: str, rev: str) -> tuple[str, Manifest]:
    """(key prefix, manifest) of revision `rev` of `name` in `store`: under its own prefix or in place.

    FileNotFoundError if the store does not hold it; ValueError if its manifest hashes to another revision
    (altered after publish).
    """
    prefix = revision_prefix(name, rev)
    try:
        m = read_manifest_at(store, name, prefix)
    except FileNotFoundError:
        try:
            m = read_manifest_at(store, name, in_place_prefix(name))
        except FileNotFoundError:
            m = None
        if m is None or revision_of(m) != rev:
            raise FileNotFoundError(f"revision {rev} of model {name!r} is not in this store") from None
        return in_place_prefix(name), m
    if revision_of(m) != rev:
        raise ValueError(f"{store.url_of(manifest_key(prefix))}: hashes to revision {revision_of(m)}, not {rev} "
                         "(altered after publish)")
    return prefix, m


def current_revision(store: Store, name: str) -> str:
    """The revision plain `name` means in `store`: its alias's, else the in-place one's (FileNotFoundError: none)."""
    alias = read_alias(store, name)
    if alias is not None:
        return alias.revision
    try:
        return revision_of(read_manifest_at(store, name, in_place_prefix(name)))
    except FileNotFoundError:
        raise FileNotFoundError(f"model {name!r} is not published in this store (no alias, no manifest)") from None


# --- listings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    """One revision of a model in one store, as `Registry.versions` lists it."""

    model: str
    revision: str  # "" while the manifest is missing (an interrupted publish) and the id is unknown
    store_url: str
    in_place: bool  # stored at `<name>/` (the first publish, or a checkpoint published before versions)
    complete: bool  # its manifest is there (publish writes it last)
    current: bool  # the alias (or, with no alias, the in-place revision) names it
    size_bytes: int
    modified_unix: float  # newest object of the revision: when it was last published

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.revision}"


@dataclass(frozen=True)
class GcItem:
    """A revision the garbage collector removed (or, in a dry run, would remove) from one store."""

    model: str
    revision: str
    store_url: str
    prefix: str
    size_bytes: int
    age_s: float
    reason: str  # "unreferenced", "incomplete publish" or "stale temp object" (then `prefix` is its key)
    deleted: bool
