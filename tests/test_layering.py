"""The layering of ../shared/ARCHITECTURE.md, enforced: `core` imports neither `sim`, `live` nor `experiments`
(nor the heavy runtimes: simpy, torch, asyncio, web servers); `live` and `sim` never import each other, and
neither imports `experiments`.

Each layer's modules are imported, all of them, in a fresh interpreter whose `sys.meta_path` starts with a
finder that refuses the forbidden packages and remembers every attempt, so an import hidden behind
`try: ... except ImportError` or `importlib.import_module` is caught too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# runs in the child: argv[1] = JSON {"root": dir on sys.path, "packages": [...], "blocked": [...]}
CHECKER = textwrap.dedent('''
    import importlib, json, sys, traceback
    from pathlib import Path

    args = json.loads(sys.argv[1])
    blocked = set(args["blocked"])
    attempts = []

    class Refuse:
        """First on sys.meta_path: a forbidden top-level package (or anything under it) cannot be imported."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                attempts.append(name)
                raise ImportError(f"layering: {name!r} may not be imported here", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    sys.path.insert(0, args["root"])
    root = Path(args["root"])
    modules = []
    for pkg in args["packages"]:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    result = {}
    for mod in modules:
        before = len(attempts)
        error = None
        try:
            importlib.import_module(mod)
        except BaseException as exc:  # a module's own failure is reported, not hidden
            error = f"{type(exc).__name__}: {exc}"
            missing = getattr(exc, "name", None)
            if isinstance(exc, ModuleNotFoundError) and missing and missing.split(".")[0] not in blocked:
                error = "missing dependency: " + missing
        result[mod] = {"refused": attempts[before:], "error": error}
    print(json.dumps(result))
''')


def import_all(root: Path, packages: list[str], blocked: list[str]) -> dict[str, dict]:
    """Import every module of `packages` (dirs under `root`) in a fresh interpreter with `blocked` refused."""
    done = subprocess.run([sys.executable, "-c", CHECKER,
                           json.dumps({"root": str(root), "packages": packages, "blocked": blocked})],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def violations(result: dict[str, dict]) -> list[str]:
    """Modules that tried a forbidden import, or failed to import for any reason but a missing dependency."""
    bad = []
    for mod, r in result.items():
        if r["refused"]:
            bad.append(f"{mod} imports {sorted(set(r['refused']))}")
        elif r["error"] and not r["error"].startswith("missing dependency"):
            bad.append(f"{mod} failed to import: {r['error']}")
    return bad


# the layer, and what it may not import (directly or through anything it imports)
LAYERS = {
    "core": ["sim", "live", "experiments", "simpy", "torch", "asyncio", "fastapi", "uvicorn", "httpx", "hydra",
             "omegaconf", "safetensors", "matplotlib"],
    "live": ["sim", "experiments", "simpy"],
    "sim": ["live", "experiments", "torch", "fastapi", "uvicorn", "httpx"],
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    result = import_all(REPO, [layer], LAYERS[layer])
    assert len(result) >= 5, result  # the walk found the layer's modules
    assert not violations(result), "\n".join(violations(result))
    if layer != "live":  # live's optional extras ([live]) may be absent; core and sim need none
        assert not [m for m, r in result.items() if r["error"]], result


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    """A layer module that imports a refused package, even guarded by try/except or lazily by name, fails."""
    pkg = tmp_path / "layer"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "plain.py").write_text("import json\n")
    (pkg / "direct.py").write_text("from forbidden.thing import x\n")
    (pkg / "sub" / "guarded.py").write_text("try:\n    import forbidden\nexcept ImportError:\n    forbidden = None\n")
    (pkg / "lazy.py").write_text("import importlib\nmod = importlib.import_module('forbidden.deep')\n")
    (pkg / "via.py").write_text("from layer import direct\n")
    (tmp_path / "forbidden").mkdir()
    (tmp_path / "forbidden" / "__init__.py").write_text("x = 1\n")
    result = import_all(tmp_path, ["layer"], ["forbidden"])
    assert set(result) == {"layer", "layer.sub", "layer.plain", "layer.direct", "layer.sub.guarded", "layer.lazy",
                           "layer.via"}
    flagged = {line.split()[0] for line in violations(result)}
    assert flagged == {"layer.direct", "layer.sub.guarded", "layer.lazy", "layer.via"}
    assert result["layer.plain"] == {"refused": [], "error": None}
