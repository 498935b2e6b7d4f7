"""Run the engine fuzzer: ``python -m tests.fuzz [--cases N] [--seconds S] [--seed X] [--jobs J]``,
or reproduce one case verbosely: ``python -m tests.fuzz --seed X --case I``.

Prints cases run, cases/s, the unique failures (deduplicated by exception type + location,
or by oracle and symptom) with a reproducer each, and the RSS at start and end."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

CHUNK = 400


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_FUZZER = None


def _worker_init() -> None:
    global _FUZZER
    from tests.fuzz.harness import Fuzzer
    _FUZZER = Fuzzer()


def _chunk(args: tuple[int, int, int]) -> tuple[int, dict, float, float, int]:
    seed, start, n = args
    before = rss_mib()
    found: dict[str, list] = {}
    for i in range(start, start + n):
        c = _FUZZER.case(seed, i)
        if c.failure is not None:
            f = c.failure
            if f.key in found:
                found[f.key][1] += 1
            else:
                found[f.key] = [f, 1]
    return n, found, before, rss_mib(), os.getpid()


def run(seed: int, cases: int | None, seconds: float | None, jobs: int, out=sys.stdout) -> dict:
    t0 = time.monotonic()
    if jobs <= 1:
        _worker_init()
        setup = time.monotonic() - t0
        print(f"fuzz: seed {seed}, 1 process, setup {setup:.1f} s (scenarios and corpus)", file=out)
        results = _serial(seed, cases, seconds, t0 + setup)
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, initializer=_worker_init) as pool:
            print(f"fuzz: seed {seed}, {jobs} processes", file=out)
            results = _parallel(pool, seed, cases, seconds, jobs, time.monotonic())
    return _report(results, seed, out)


PROGRESS = 60.0     # seconds between progress lines on long runs


class _Progress:
    def __init__(self, t_start: float) -> None:
        self.t_start = self.last = t_start

    def __call__(self, done: int, failures: dict) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS:
            self.last = now
            dt = now - self.t_start
            print(f"  ... {done} cases, {done / dt:.0f} cases/s, {len(failures)} unique failures",
                  file=sys.stderr, flush=True)


def _serial(seed, cases, seconds, t_start):
    done, failures, rss = 0, {}, {}
    progress = _Progress(t_start)
    while (cases is None or done < cases) and (seconds is None or time.monotonic() - t_start < seconds):
        n = CHUNK if cases is None else min(CHUNK, cases - done)
        k, found, r0, r1, pid = _chunk((seed, done, n))
        _merge(failures, found)
        rss.setdefault(pid, [r0, r1])[1] = r1
        done += k
        progress(done, failures)
    return done, failures, rss, time.monotonic() - t_start


def _parallel(pool, seed, cases, seconds, jobs, t_start):
    done = submitted = 0
    failures, rss = {}, {}
    pending = []
    progress = _Progress(t_start)

    def more() -> bool:
        return ((cases is None or submitted < cases) and
                (seconds is None or time.monotonic() - t_start < seconds))

    while True:
        while len(pending) < 2 * jobs and more():
            n = CHUNK if cases is None else min(CHUNK, cases - submitted)
            pending.append(pool.apply_async(_chunk, ((seed, submitted, n),)))
            submitted += n
        if not pending:
            break
        r = pending.pop(0).get()
        k, found, r0, r1, pid = r
        _merge(failures, found)
        rss.setdefault(pid, [r0, r1])[1] = r1
        done += k
        progress(done, failures)
    return done, failures, rss, time.monotonic() - t_start


def _merge(into: dict, found: dict) -> None:
    for key, (f, n) in found.items():
        if key in into:
            into[key][1] += n
            if f.index < into[key][0].index:
                into[key][0] = f
        else:
            into[key] = [f, n]


def _report(results, seed, out) -> dict:
    done, failures, rss, dt = results
    print(f"cases run: {done} in {dt:.1f} s ({done / dt if dt else 0:.0f} cases/s)", file=out)
    kinds: dict[str, int] = {}
    for f, n in failures.values():
        kinds[f.kind] = kinds.get(f.kind, 0) + n
    print(f"failing cases: {sum(n for _, n in failures.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'none'}); "
          f"unique failures: {len(failures)}", file=out)
    for f, n in sorted(failures.values(), key=lambda x: -x[1]):
        print(f"\n{n} case(s): " + f.report(), file=out)
    for pid, (r0, r1) in sorted(rss.items()):
        print(f"RSS of worker {pid}: start {r0:.1f} MiB, end {r1:.1f} MiB", file=out)
    return {"cases": done, "failures": failures, "seconds": dt, "rss": rss}


def reproduce(seed: int, index: int) -> int:
    from tests.fuzz.harness import Fuzzer
    c = Fuzzer().case(seed, index)
    print(f"case {seed}:{index} scenario {c.scenario} ({'authenticated' if c.verified else 'unauthenticated'})")
    for s in c.steps:
        print("  " + s)
    if c.failure is None:
        print("no failure")
        return 0
    print(c.failure.report())
    if c.failure.tb:
        print(c.failure.tb)
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--case", type=int, default=None, help="reproduce this one case verbosely")
    a = p.parse_args(argv)
    if a.case is not None:
        return reproduce(a.seed, a.case)
    if a.cases is None and a.seconds is None:
        a.cases = 10000
    r = run(a.seed, a.cases, a.seconds, a.jobs)
    return 1 if r["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
