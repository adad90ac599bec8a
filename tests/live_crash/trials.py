"""What every crash trial shares: the seed and the trial counts, seeded kill points spread over an operation's
measured duration, running `scripts/crash_trial.py` and SIGKILLing it, a verified fetch, and the per-scenario
summary printed at the end. The scenarios (issue 14 item 8, in test_crash_registry.py, test_crash_agent.py and
test_crash_serve.py) SIGKILL a publisher, a download, an agent or the gateway at seeded random points, then check
the files on disk and in the store, and that a restart recovers its state from disk.

Every kill point is drawn uniformly from [0, 1.15] x the measured duration of the same, un-killed operation (so a
few land after it finished: the "done" outcome). After each kill the checks read the real store / tier dirs:

- publisher: the registry lists a revision as complete only when its manifest is there, and every file that
  manifest names is in the store at its size; the alias (or in-place revision) names a complete revision that
  fetches and verifies; an incomplete revision is listed incomplete, is not fetchable, and gc (grace 0) removes
  it; a re-publish then succeeds and becomes current.
- download: the destination is absent or complete and verified; staging leftovers are `.tierlab-` dirs (never
  listed as a model by a tier, swept by an agent's tier at start) and a new fetch succeeds.
- agent: after a restart on the same dirs every tier holds a model only complete and marked with its revision,
  staging dirs are swept, /status lists exactly the model dirs on disk, used bytes equal the files' bytes, and
  the engine the killed agent had started is gone (its whole process group).
- gateway (`experiments.serve`, under load): its agents and engines exit (no orphans); restarted on the same
  workdir, the persistent tiers hold only complete, marked copies and requests are served.

A strict xfail documents what a crash leaves behind that nothing removes: store temp files of an interrupted
write (never visible, never collected).

`TIERLAB_CRASH_TRIALS` sets the trials per scenario (default: a few, to keep the file near a minute);
`TIERLAB_CRASH_SEED` the seed. Each scenario prints a summary (kill points and outcomes).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from live.manifest import Manifest, verify
from live.registry import Registry
from tests.live_serve.serving import env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "crash_trial.py"
SEED = int(os.environ.get("TIERLAB_CRASH_SEED", "20261203"))
KILL_SPREAD = 1.15  # kill points up to 15 % past the measured duration: some trials see the operation done


def n_trials(default: int) -> int:
    """The trials per scenario: TIERLAB_CRASH_TRIALS, else `default`."""
    return max(1, int(os.environ.get("TIERLAB_CRASH_TRIALS", default)))


def rng_for(scenario: str) -> random.Random:
    """A seeded generator per scenario (independent of the order the tests run in)."""
    return random.Random(SEED ^ zlib.crc32(scenario.encode()))


def kill_points(rng: random.Random, n: int) -> list[float]:
    """`n` kill points as fractions of the measured duration: one uniform draw in each of `n` equal strata of
    [0, KILL_SPREAD], shuffled, so that even a few trials cover the whole operation (and its end)."""
    points = [(i + rng.random()) / n * KILL_SPREAD for i in range(n)]
    rng.shuffle(points)
    return points


@dataclass
class Summary:
    """Per-scenario record of kill points and outcomes, printed at the end of the test."""

    scenario: str
    measured_s: float = 0.0
    rows: list[tuple[float, str, str]] = field(default_factory=list)  # (kill fraction, outcome, leftovers)

    def add(self, fraction: float, outcome: str, leftovers: str = "") -> None:
        self.rows.append((fraction, outcome, leftovers))

    def text(self) -> str:
        fractions = sorted(f for f, _o, _l in self.rows)
        bins = Counter(min(int(f * 4), 4) for f in fractions)  # quarters of the measured duration, 4 = after
        outcomes = Counter(o for _f, o, _l in self.rows)
        leftovers = Counter(x for _f, _o, left in self.rows for x in left.split(",") if x)
        return (f"[crash] {self.scenario}: {len(self.rows)} trials, op {self.measured_s * 1e3:.0f} ms; kill points "
                f"(fraction of op) {[round(f, 2) for f in fractions]}; per quarter "
                f"{[bins.get(i, 0) for i in range(5)]}; outcomes {dict(outcomes)}; leftovers {dict(leftovers)}")


def show_summary(capsys: pytest.CaptureFixture[str], summary: Summary) -> None:
    with capsys.disabled():
        print("\n" + summary.text())


def run_child(argv: Sequence[str], kill_after_s: float | None, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Run scripts/crash_trial.py; SIGKILL it `kill_after_s` after it says START (None: let it finish).

    Returns (killed, its output). `killed` is False when it had finished before the kill point.
    """
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO)
    assert proc.stdout is not None
    lines = []
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=timeout_s)
                raise AssertionError(f"crash_trial {argv[0]} exited {proc.returncode} before START:\n"
                                     + "".join(lines))
            lines.append(line)
            if line.strip() == "START":
                break
        if kill_after_s is None:
            out, _ = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, "".join(lines) + out
            return False, "".join(lines) + out
        time.sleep(kill_after_s)
        killed = proc.poll() is None
        if killed:
            proc.kill()
        out, _ = proc.communicate(timeout=timeout_s)
        if not killed:
            assert proc.returncode == 0, "".join(lines) + out
        return killed, "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def done_seconds(output: str) -> float:
    """The operation's duration a child reported (`DONE <seconds>`)."""
    line = next(x for x in output.splitlines() if x.startswith("DONE "))
    return float(line.split()[1])


def fetch_verified(registry: Registry, ref: str, dest: Path, manifest: Manifest | None = None) -> Manifest:
    """Fetch `ref` into the fresh `dest` and check the files against the manifest once more; the manifest."""
    expected = manifest if manifest is not None else registry.manifest(ref)
    got = registry.fetch(ref, dest, streams=4, manifest=expected)
    assert not got.cached
    assert verify(dest, expected) == []
    return expected
