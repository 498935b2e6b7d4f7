"""Where isthmusd's start-up goes (issue 13), not run by `make bench`: the interpreter, the
imports of `appliance.daemon`, and config read + validation + planning of N tunnels (the
config of tests/bench/lab_responder_scale.py), each in a fresh interpreter, timed by wall clock
(the lab guest: run it there, under TCG the proportions differ from the host's).

    python3 tests/bench/profile_startup.py [N] [--profile]    (N default 1000)

`--profile` prints the imports slower than 20 ms (`-X importtime`, cumulative) and a cProfile
of the config steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

from tests.bench.lab_responder_scale import PSK, isthmus_config  # noqa: E402

CONFIG_STEPS = """
import sys, time
t0 = time.perf_counter()
from appliance.config import load_config
from appliance.tunnels import plan_tunnels
t1 = time.perf_counter()
prof = None
if {profile}:
    import cProfile
    prof = cProfile.Profile(); prof.enable()
c = load_config({path!r})
t2 = time.perf_counter()
plans = plan_tunnels(c)
t3 = time.perf_counter()
if prof:
    prof.disable()
    import pstats
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
print(f"RESULT import {{t1 - t0:.3f}} load {{t2 - t1:.3f}} plan {{t3 - t2:.3f}}")
"""


PREFIX: dict[str, str] = {}


def run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd="/", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [PREFIX.get("PYTHONPATH", str(TOP))]
                              + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])})


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1000
    profile = "--profile" in sys.argv
    with tempfile.TemporaryDirectory() as d:
        psk = Path(d) / "bench.psk"
        psk.write_text(PSK + "\n")
        os.chmod(psk, 0o600)
        cfg = Path(d) / "isthmus.yaml"
        cfg.write_text(isthmus_config(n, str(psk)))
        t0 = time.monotonic()
        run("pass")
        bare = time.monotonic() - t0
        t0 = time.monotonic()
        r = run("import appliance.daemon")
        cold = time.monotonic() - t0 - bare
        if r.returncode:
            print(r.stderr)
            return 1
        # byte-compiled, as the image installs it (the lab mounts the source without .pyc files)
        from tests.bench.lab_responder_scale import COMPILED, byte_compile
        byte_compile(Path(d))
        PREFIX["PYTHONPATH"] = COMPILED[str(TOP)]
        t0 = time.monotonic()
        run("import appliance.daemon")
        imports = time.monotonic() - t0 - bare
        print(f"import appliance.daemon without .pyc files: {cold:.2f} s", flush=True)
        r = run(CONFIG_STEPS.format(path=str(cfg), profile=profile))
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), r.stderr)
        print(f"start-up pieces, N={n}: bare interpreter {bare:.2f} s; import appliance.daemon {imports:.2f} s "
              f"more (byte-compiled); config: {line}", flush=True)
        if profile:
            print(r.stdout)
            r = run("import appliance.daemon", "-X", "importtime")
            rows = []
            for x in r.stderr.splitlines():
                if not x.startswith("import time:") or "|" not in x:
                    continue
                self_us, cum_us, name = (p.strip() for p in x[len("import time:"):].split("|"))
                if cum_us.isdigit() and int(cum_us) >= 20_000:
                    rows.append((int(cum_us), int(self_us), name))
            for cum, own, name in sorted(rows, reverse=True)[:60]:
                print(f"  {cum / 1000:8.1f} ms cumulative {own / 1000:8.1f} ms own  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
