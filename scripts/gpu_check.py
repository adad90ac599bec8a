"""The parts of scripts/gpu_check.sh: environment, the to-GPU loader benchmark, and the Tokasaurus engine path.

Each subcommand writes one JSON (`--json`) and exits non-zero when its check failed, so the shell
script can run each under its own `timeout` and still summarise all of them:

    python scripts/gpu_check.py env --json OUT/env.json
    python scripts/gpu_check.py loader --device cuda --preset large --rounds 3 --json OUT/loader.json
    python scripts/gpu_check.py toka --site /tmp/site-hf:/tmp/site --site /tmp/site --budget-s 240 \\
        --json OUT/toka.json --log-dir OUT --pgid-file OUT/toka.pgid
    python scripts/gpu_check.py summary --out OUT            # OUT/results.json from OUT/parts.tsv + the JSONs

`toka` starts Tokasaurus with `TokasaurusProcess` through scripts/toka_compat.py, once per `--site`
(a PYTHONPATH prefix holding the carried wheels) until one attempt passes or the budget runs out:
start -> GET /ping -> a few completions -> stop, and checks that no process of the group is left.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/gpu_check.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

from live.checkpoint import generate_checkpoint  # noqa: E402
from live.engines import (  # noqa: E402
    EngineStartError,
    TokasaurusProcess,
    count_params,
    free_port,
    running_group_members,
    toka_profile,
)
from live.manifest import WEIGHTS_FILE  # noqa: E402

PACKAGES = ("torch", "safetensors", "tokenizers", "transformers", "huggingface-hub", "numpy", "httpx", "fastapi",
            "uvicorn", "pydantic", "triton", "ninja", "accelerate", "flashinfer-python", "apache-tvm-ffi",
            "tokasaurus", "openai")
PROMPTS = ("hello world", "The quick brown fox", "Serverless inference loads a model when", "tierlab")


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a temp file renamed into place), so a killed run leaves no half JSON."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_cmd(argv: list[str], timeout_s: float = 30) -> dict[str, Any]:
    """{rc, output} of a command; a missing command or a timeout is recorded, not raised."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        return {"rc": done.returncode, "output": (done.stdout + done.stderr).strip()}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": None, "output": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------- env


def cmd_env(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"python": sys.version, "executable": sys.executable, "platform": platform.platform(),
                            "cpus": os.cpu_count(), "uid": os.geteuid(), "repo": str(REPO)}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    info["nvidia_smi"] = run_cmd(["nvidia-smi"])
    info["nvcc"] = run_cmd(["nvcc", "--version"])
    info["nvcc_path"] = shutil.which("nvcc")
    info["ninja_path"] = shutil.which("ninja")
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpus"] = [{"name": torch.cuda.get_device_name(i), "capability": torch.cuda.get_device_capability(i),
                             "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                            for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken torch is a finding, not a reason to stop
        info["torch_error"] = f"{type(e).__name__}: {e}"
    print(info["nvidia_smi"]["output"])
    print(info["nvcc"]["output"].splitlines()[-1] if info["nvcc"]["output"] else "nvcc: -")
    print(json.dumps({k: v for k, v in info.items() if k not in ("nvidia_smi", "nvcc")}, indent=2, default=str))
    write_json(args.json, info)
    return 0 if not args.require_gpu or info.get("cuda_available") else 1


# --------------------------------------------------------------------------- loader


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True if both loads hold the same tensor names with equal contents."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def cmd_loader(args: argparse.Namespace) -> int:
    from live.loader import load
    from scripts.bench_loader import compare_loaders, safetensors_read

    result: dict[str, Any] = {"device": args.device, "preset": args.preset, "rounds": args.rounds}
    try:
        ckpt = args.dir or Path("/tmp/gpu_check") / f"{args.preset}-seed0"
        if not (ckpt / WEIGHTS_FILE).is_file():
            t = time.perf_counter()
            info = generate_checkpoint(ckpt, args.preset, 0, overwrite=True)
            result["generate_s"] = time.perf_counter() - t
            print(f"generated {info.path} ({info.total_bytes / 1e9:.3f} GB) in {result['generate_s']:.1f} s",
                  flush=True)
        device = None if args.device == "cpu" else args.device
        result["same_weights_as_safetensors"] = same_weights(load(ckpt, device=device).tensors,
                                                             safetensors_read(ckpt / WEIGHTS_FILE, args.device))
        report = compare_loaders(ckpt, rounds=args.rounds, device=args.device)
        print(report.table(), flush=True)
        result["report"] = report.to_dict()
        result["ratios_best"] = {m: report.ratio(m) for m in report.results}
        result["GBps_best"] = {m: report.GBps(m) for m in report.results}
        result["ok"] = bool(result["same_weights_as_safetensors"])
    except Exception as e:
        traceback.print_exc()
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    finally:  # also when `timeout` ended the run (SystemExit from the SIGTERM handler)
        result.setdefault("ok", False)
        write_json(args.json, result)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- tokasaurus


def post_json(url: str, body: dict[str, Any], timeout_s: float) -> tuple[int, str, bytes]:
    """(status, content-type, body bytes) of a JSON POST; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.headers.get("content-type", ""), err.read()


def toka_env(site: str) -> dict[str, str]:
    """What the Tokasaurus processes get on top of this environment: the wheel site, JIT caches, no hub access."""
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (site, str(REPO)) if p),
        # the venv's bin holds `ninja`, which FlashInfer's JIT runs by name
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
        "FLASHINFER_WORKSPACE_BASE": "/tmp/gpu_check_flashinfer",  # JIT cache: <base>/.cache/flashinfer
        "TVM_FFI_CACHE_DIR": "/tmp/gpu_check_tvm_ffi",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/gpu_check_inductor",
        "MAX_JOBS": str(os.cpu_count() or 4),  # ninja jobs per JIT module
        "TOKA_COMPAT_PREFILL_BACKEND": os.environ.get("TOKA_COMPAT_PREFILL_BACKEND", "fa2"),  # fa3 compiles longer
        "HF_HUB_OFFLINE": "1",  # no network there: fail fast instead of retrying the hub
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    nvcc = shutil.which("nvcc")
    if "CUDA_HOME" not in os.environ and nvcc:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parents[1])
    return env


def toka_attempt(ckpt: Path, site: str, budget_s: float, n_completions: int, log_dir: Path | None,
                 pgid_file: Path | None, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """One Tokasaurus start on `ckpt` with `site` first on PYTHONPATH; its timings and checks, appended to `attempts`
    at once (so an interrupted attempt is still reported)."""
    index = len(attempts)
    profile = toka_profile(count_params(ckpt), 1)
    engine = TokasaurusProcess(ckpt, free_port(), profile=profile,
                               executable=[sys.executable, str(REPO / "scripts" / "toka_compat.py")],
                               env=toka_env(site))
    out: dict[str, Any] = {"site": site, "profile": profile.name, "argv": engine.command(), "ok": False}
    attempts.append(out)
    print(f"attempt {index}: {' '.join(out['argv'])} (PYTHONPATH={site}), budget {budget_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    pgid = None
    try:
        engine.start()
        pgid = engine.pgid
        out["start_s"] = time.perf_counter() - t0
        if pgid_file is not None:
            pgid_file.write_text(str(pgid))  # the shell kills this group if we are killed before stop()
        out["ready_s"] = engine.wait_ready(timeout_s=budget_s)
        print(f"ready after {out['ready_s']:.1f} s", flush=True)
        completions = []
        for i in range(n_completions):
            body = {"model": ckpt.name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 16, "temperature": 0}
            t = time.perf_counter()
            status, _, raw = post_json(engine.url + "/v1/completions", body, timeout_s=60)
            latency_s = time.perf_counter() - t
            reply = json.loads(raw) if status == 200 else {"error": raw.decode(errors="replace")[:500]}
            if i == 0:
                out["first_completion_s"] = latency_s
                out["start_to_first_completion_s"] = time.perf_counter() - t0
            choice = (reply.get("choices") or [{}])[0]
            completions.append({"status": status, "latency_s": latency_s, "text": choice.get("text"),
                                "usage": reply.get("usage"), "error": reply.get("error")})
        out["completions"] = completions
        out["completions_ok"] = all(c["status"] == 200 and isinstance(c["text"], str)
                                    and (c["usage"] or {}).get("completion_tokens", 0) > 0 for c in completions)
        # what a stream=true request gets (the gateway synthesizes SSE for engines that answer with JSON)
        body = {"model": ckpt.name, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
        status, content_type, raw = post_json(engine.url + "/v1/completions", body, timeout_s=60)
        out["stream_request"] = {"status": status, "content_type": content_type, "body_head": raw[:300].decode(
            errors="replace")}
        out["ok"] = bool(out["completions_ok"])
    except (EngineStartError, TimeoutError) as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    except Exception as e:
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        t = time.perf_counter()
        engine.stop()
        out["stop_s"] = time.perf_counter() - t
        out["left_running_after_stop"] = running_group_members(pgid) if pgid is not None else []
        out["no_orphans"] = not out["left_running_after_stop"]
        out["ok"] = out["ok"] and out["no_orphans"]
        if not out["ok"] and "error" not in out:
            out["error"] = ("processes left after stop" if not out["no_orphans"] else
                            "completions failed" if "completions" in out else "interrupted (SIGTERM)")
        out["total_s"] = time.perf_counter() - t0
        if engine.log_path is not None and log_dir is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(engine.log_path, log_dir / f"toka_engine_attempt{index}.log")
        out["log_tail"] = engine.log_tail(3000)
        # usually the exception that ended it
        out["log_last_line"] = next((ln for ln in reversed(out["log_tail"].splitlines()) if ln.strip()), "")
        engine.close()
    print(json.dumps({k: v for k, v in out.items() if k != "log_tail"}, indent=2, default=str), flush=True)
    if not out["ok"]:
        print(f"--- engine log tail (attempt {index}) ---\n{out['log_tail']}", flush=True)
    return out


def cmd_toka(args: argparse.Namespace) -> int:
    deadline = time.perf_counter() + args.budget_s - args.reserve_s
    result: dict[str, Any] = {"budget_s": args.budget_s, "attempts": [], "ok": False}
    try:
        ckpt = args.dir or Path("/tmp/gpu_check") / f"toka-{args.preset}-seed0"
        if not (ckpt / "config.json").is_file():
            t = time.perf_counter()
            generate_checkpoint(ckpt, args.preset, 0, overwrite=True)
            result["generate_s"] = time.perf_counter() - t
        result["checkpoint"] = str(ckpt)
        result["n_params"] = count_params(ckpt)
        for i, site in enumerate(args.site or [""]):
            left_s = deadline - time.perf_counter()
            if left_s < args.min_attempt_s:
                result["skipped_sites"] = args.site[i:]
                break
            attempt = toka_attempt(ckpt, site, left_s, args.completions, args.log_dir, args.pgid_file,
                                   result["attempts"])
            # a slow start (JIT compile) would be as slow again with the next site; only a crash is worth a retry
            if attempt["ok"] or "TimeoutError" in attempt.get("error", ""):
                break
    except Exception as e:
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    finally:  # also when `timeout` ended the run (SystemExit from the SIGTERM handler)
        result["ok"] = any(a["ok"] for a in result["attempts"])
        write_json(args.json, result)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- summary


def cmd_summary(args: argparse.Namespace) -> int:
    out_dir: Path = args.out
    parts: dict[str, Any] = {}
    tsv = out_dir / "parts.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, rc, seconds = line.split("\t")
        status = {"0": "passed", "124": "timeout", "137": "timeout", "skipped": "skipped"}.get(rc, "failed")
        part: dict[str, Any] = {"status": status, "rc": rc, "seconds": int(seconds)}
        path = out_dir / f"{name}.json"
        if path.is_file():
            try:
                part["result"] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                part["result_error"] = f"{path}: {e}"
        parts[name] = part
    results = {"parts": parts, "passed": [n for n, p in parts.items() if p["status"] == "passed"],
               "failed": [n for n, p in parts.items() if p["status"] not in ("passed", "skipped")]}
    headline: dict[str, Any] = {}
    loader = parts.get("loader", {}).get("result") or {}
    if loader.get("GBps_best"):
        headline["loader"] = {"device": loader["device"], "GBps_best": loader["GBps_best"],
                              "ratio_vs_raw_best": loader["ratios_best"],
                              "same_weights": loader.get("same_weights_as_safetensors")}
    toka = parts.get("toka", {}).get("result") or {}
    for a in toka.get("attempts", []):
        headline.setdefault("toka_attempts", []).append(
            {k: a.get(k) for k in ("site", "ok", "error", "log_last_line", "start_s", "ready_s", "first_completion_s",
                                   "start_to_first_completion_s", "no_orphans", "stop_s")})
    results["headline"] = headline
    write_json(out_dir / "results.json", results)
    print("=== gpu_check summary")
    for name, part in parts.items():
        print(f"{name:<10} {part['status']:<8} rc={part['rc']:<8} {part['seconds']:>4} s")
    print(json.dumps(headline, indent=1, default=str))
    print(f"passed: {results['passed']}  failed: {results['failed']}  ->  {out_dir / 'results.json'}")
    return 0


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    env = sub.add_parser("env", help="versions, GPUs, nvcc")
    env.add_argument("--json", type=Path)
    env.add_argument("--require-gpu", action="store_true", help="fail when torch sees no GPU")
    loader = sub.add_parser("loader", help="loader vs raw read vs safetensors into --device, cold cache")
    loader.add_argument("--device", default="cuda")
    loader.add_argument("--preset", default="large")
    loader.add_argument("--rounds", type=int, default=3)
    loader.add_argument("--dir", type=Path, help="checkpoint dir (generated if missing)")
    loader.add_argument("--json", type=Path)
    toka = sub.add_parser("toka", help="start Tokasaurus, wait for /ping, complete, stop")
    toka.add_argument("--site", action="append", help="PYTHONPATH prefix holding tokasaurus; one attempt each")
    toka.add_argument("--preset", default="small")
    toka.add_argument("--dir", type=Path, help="checkpoint dir (generated if missing)")
    toka.add_argument("--budget-s", type=float, default=240.0, help="for all attempts together")
    toka.add_argument("--min-attempt-s", type=float, default=60.0, help="no new attempt with less time left")
    toka.add_argument("--reserve-s", type=float, default=25.0, help="of the budget, kept for completions and stop")
    toka.add_argument("--completions", type=int, default=4)
    toka.add_argument("--log-dir", type=Path)
    toka.add_argument("--pgid-file", type=Path)
    toka.add_argument("--json", type=Path)
    summary = sub.add_parser("summary", help="OUT/results.json from OUT/parts.tsv and the parts' JSONs")
    summary.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    # `timeout` sends SIGTERM: leave through the finally blocks, which stop the engine and write the JSON
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return {"env": cmd_env, "loader": cmd_loader, "toka": cmd_toka, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
