"""Registry administration over stores: listing a model's revisions, moving its alias (rollback), and collecting
revisions nothing refers to. `live.registry.Registry` exposes these as methods; the key layout and the alias
object are `live.registry_versions`'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from live.registry_versions import (
    Alias,
    GcItem,
    RegistryError,
    VersionInfo,
    alias_key,
    check_model_name,
    check_revision,
    current_revision,
    in_place_prefix,
    locate,
    manifest_key,
    parse_ref,
    read_alias,
    read_manifest_at,
    revision_of,
    revision_of_key,
    revision_prefix,
)
from live.stores import ObjectInfo, Store

log = logging.getLogger(__name__)


def write_alias(store: Store, alias: Alias) -> None:
    """Write `alias` as one object: a single PUT, so readers see the old alias or the new one, never a mix
    (two writers at once: the last one wins, each having pointed it at a complete revision)."""
    store.put_bytes(alias_key(alias.model), alias.to_json().encode())


def set_alias(stores: Sequence[Store], name: str, revision: str, op: str, by: str | None) -> Alias | None:
    """Point `name` at `revision` in every store that holds that revision whole; the first store's alias after.

    A store where `revision` is the current one already is left as is (no move recorded). Raises RegistryError
    naming the stores that lack the revision (their alias is left where it was).
    """
    check_revision(revision, name)
    problems: list[str] = []
    result: Alias | None = None
    for store in stores:
        try:
            locate(store, name, revision)  # never point an alias at a revision the store does not hold
            alias = read_alias(store, name)
            current = alias.revision if alias is not None else current_revision(store, name)
            if current != revision:
                now = time.time()
                alias = alias.moved(revision, op, now, by) if alias is not None else \
                    Alias.first(name, revision, current, op, now, by)
                write_alias(store, alias)
            result = result or alias
        except Exception as e:
            problems.append(f"{store.url}: {type(e).__name__}: {e}")
    if problems:
        raise RegistryError(f"model {name!r}: alias not moved to revision {revision} in {len(problems)} of "
                         f"{len(stores)} stores:\n  " + "\n  ".join(problems))
    return result


@dataclass
class _Group:
    """The objects of one revision (or of the in-place slot) in one store's listing."""

    prefix: str
    in_place: bool
    keys: list[str]
    size_bytes: int = 0
    modified_unix: float = 0.0


def _groups(store: Store, name: str) -> dict[str, _Group]:
    """`name`'s objects in `store`, by revision dir ("" for the in-place slot); the alias object left out."""
    out: dict[str, _Group] = {}
    listing: dict[str, ObjectInfo] = store.list_detail(name)
    for key, info in listing.items():
        rev = revision_of_key(name, key)
        if rev is None:
            continue
        prefix = in_place_prefix(name) if rev == "" else revision_prefix(name, rev)
        g = out.setdefault(rev, _Group(prefix, rev == "", []))
        g.keys.append(key)
        g.size_bytes += info.size_bytes
        g.modified_unix = max(g.modified_unix, info.modified_unix)
    return out


def _revision(store: Store, name: str, dir_rev: str, group: _Group) -> tuple[str, bool]:
    """(revision id, complete) of a group: the in-place slot's id is its manifest's hash ("" if it has none)."""
    complete = manifest_key(group.prefix) in group.keys
    if dir_rev:
        return dir_rev, complete
    if not complete:
        return "", False
    return revision_of(read_manifest_at(store, name, group.prefix)), True


def list_versions(stores: Sequence[Store], name: str) -> list[VersionInfo]:
    """Every revision of `name` in every store, oldest first (by its newest object)."""
    out = []
    for store in stores:
        try:
            current: str | None = current_revision(store, name)
        except FileNotFoundError:
            current = None
        for dir_rev, g in _groups(store, name).items():
            rev, complete = _revision(store, name, dir_rev, g)
            out.append(VersionInfo(name, rev, store.url, dir_rev == "", complete, complete and rev == current,
                                   g.size_bytes, g.modified_unix))
    return sorted(out, key=lambda v: (v.modified_unix, v.store_url, v.revision))


def _model_names(store: Store) -> list[str]:
    """The models a store holds objects of (first key component, safe names only)."""
    names = set()
    for key in store.list_detail(""):
        first = key.split("/", 1)[0]
        try:
            names.add(check_model_name(first))
        except ValueError:
            continue
    return sorted(n for n in names if parse_ref(n)[1] is None)  # variants (`x@int8`) are models, pins are not


def _keep_set(keep: Iterable[str], name: str) -> set[str]:
    """The revisions of `name` that `keep` protects: its `name@rev` entries and every bare revision id."""
    out = set()
    for item in keep:
        if "@" not in item:
            out.add(check_revision(item, name))
            continue
        model, rev = parse_ref(item)
        if rev is None:
            raise ValueError(f"keep {item!r}: names no revision (`name@revision`, or a bare revision id)")
        if model == name:
            out.add(rev)
    return out


def gc(stores: Sequence[Store], name: str | None, keep: Iterable[str], grace_s: float, dry_run: bool,
       now_unix: float | None = None) -> list[GcItem]:
    """Remove the revisions of `name` (None: every model) that nothing refers to; what went (or would go).

    A revision stays if any store's alias names it (with no alias, the in-place revision is the current one),
    if `keep` names it, or if its newest object is younger than `grace_s` (a publish in flight, a fetch that
    just resolved it). An incomplete revision (no manifest: an interrupted publish) past the grace goes too.
    Before deleting, the store's alias is read again, so a rollback meanwhile still protects its target. The
    manifest is deleted first: readers then no longer find the revision rather than find it partial. If any
    store's alias of a model cannot be read, nothing of that model is collected (RegistryError).
    """
    keep = list(keep)
    now = time.time() if now_unix is None else now_unix
    names = [name] if name is not None else sorted({n for s in stores for n in _model_names(s)})
    items: list[GcItem] = []
    for model in names:
        protected = _keep_set(keep, model)
        for store in stores:
            try:
                protected.add(current_revision(store, model))
            except FileNotFoundError:
                pass  # not published in this store
            except Exception as e:  # an unreadable alias: which revision is current is unknown, so delete nothing
                raise RegistryError(f"model {model!r}: cannot read the current revision in {store.url} ({e}); "
                                 "nothing of it was collected") from e
        for store in stores:
            items += _collect(store, model, protected, now, grace_s, dry_run)
            items += _collect_temps(store, model, now, grace_s, dry_run)
    return items


def _collect_temps(store: Store, name: str, now: float, grace_s: float, dry_run: bool) -> list[GcItem]:
    """Temp objects of atomic writes under `name/` older than `grace_s`: a writer killed between write and
    rename leaves them (listings hide them, so the revision groups never include them). Younger ones may be a
    publish in flight and stay."""
    items = []
    for key, info in store.list_detail(name, temps=True).items():
        age = now - info.modified_unix
        if age < grace_s:
            continue
        if not dry_run:
            store.delete(key)
            log.info("gc: deleted stale temp object %s from %s (%d bytes, %.0f s old)", key, store.url,
                     info.size_bytes, age)
        items.append(GcItem(name, "", store.url, key, info.size_bytes, age, "stale temp object",
                            deleted=not dry_run))
    return items


def _collect(store: Store, name: str, protected: set[str], now: float, grace_s: float,
             dry_run: bool) -> list[GcItem]:
    items = []
    for dir_rev, g in _groups(store, name).items():
        rev, complete = _revision(store, name, dir_rev, g)
        age = now - g.modified_unix
        if (rev and rev in protected) or age < grace_s:
            continue
        item = GcItem(name, rev, store.url, g.prefix, g.size_bytes, age,
                      "unreferenced" if complete else "incomplete publish", deleted=not dry_run)
        if not dry_run:
            if rev and current_revision_or_none(store, name) == rev:
                continue  # moved here since the scan (a rollback): never delete the aliased revision
            _delete(store, g, complete)
            log.info("gc: deleted %s@%s from %s (%d bytes, %.0f s old)", name, rev, store.url, g.size_bytes, age)
        items.append(item)
    return items


def current_revision_or_none(store: Store, name: str) -> str | None:
    try:
        return current_revision(store, name)
    except FileNotFoundError:
        return None


def _delete(store: Store, group: _Group, complete: bool) -> None:
    """Delete a revision's objects, its manifest first (so no reader finds a partial revision)."""
    if complete:
        store.delete(manifest_key(group.prefix))
    if not group.in_place:  # a revision dir of its own: one recursive delete
        store.delete(group.prefix)
        return
    for key in group.keys:  # the in-place slot shares `<name>/` with the alias and the revision dirs
        store.delete(key)
