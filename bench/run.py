"""s3rollup benchmark: the engine, its incremental path and the usual alternatives, side by side.

    make bench                           # 20 parts x 1,000,000 rows, 3 repetitions
    make bench-quick                     # smoke test of the harness (4 x 50,000, 1 rep)

Every candidate run is its own fresh process (bench/candidates.py); the repetitions are
interleaved (A B C ... A B C ...) so the machine's noise hits every candidate alike. See
bench/README.md for what each candidate is and how time and memory are measured.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import inspect
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import profiles  # noqa: E402
from bench.profiles import PROFILES, Profile  # noqa: E402
from s3rollup import native  # noqa: E402
from s3rollup.contract import DEFAULT_CONTRACT  # noqa: E402
from s3rollup.demo import to_csv_bytes  # noqa: E402
from s3rollup.job import available_cpus  # noqa: E402
from s3rollup.reference import compare_frames  # noqa: E402

CHILD = Path(__file__).resolve().parent / "candidates.py"
WRAP = Path(__file__).resolve().parent / "rusage_wrap.py"
RESULTS = Path(__file__).resolve().parent / "results"
RTOL = 1e-9
MAIN_CANDIDATES = (
    "s3rollup-engine",
    # The same without the body's SHA-256 that every job takes (the audit's identity of a
    # part): not a way s3rollup runs, the measure of what the SHA-256 costs.
    "s3rollup-engine-no-sha256",
    "pandas-seed",
    "dask-seed",
    "dask-cpus",
    "polars",
    "polars+sha256",
    "duckdb",
)
# --baseline: s3rollup-engine as another checkout's code runs it, beside this one's.
BASELINE = "s3rollup-engine@baseline"
# Seconds to minutes a run: --slow-reps may give them fewer repetitions than the others.
SLOW_CANDIDATES = ("pandas-seed", "dask-seed", "dask-cpus")
VALUES = ("value1", "value2", "value3")
STATS = ("mean", "std", "min", "max")
LIBRARIES = ("pandas", "numpy", "pyarrow", "dask", "distributed", "polars", "duckdb", "psutil")
# --quick: the harness end to end in well under a minute on 2 busy cores. dask-seed is left
# out (its 8 worker processes take ~30 s to start here, whatever the data); pass
# --candidates/--formats with --quick to include more.
QUICK = {
    "parts": 4,
    "rows": 20_000,
    "reps": 1,
    "formats": "csv",
    "candidates": "s3rollup-engine,pandas-seed,dask-cpus,polars,duckdb,s3rollup-incremental",
    "incremental_n": "4",
    "incremental_rows": 20_000,
    "e2e_n": 4,
    "e2e_rows": 20_000,
}
# Bytes on disk per generated row: CSV (~72) plus snappy Parquet (~33), with some margin.
BYTES_PER_ROW = 110


def say(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---- data: generated parts, stored partials, pandas references --------------------------


def _fingerprint(*objs: Any, files: tuple[Path, ...] = ()) -> str:
    h = hashlib.sha256()
    for o in objs:
        h.update(inspect.getsource(o).encode() if callable(o) else repr(o).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Pool:
    """Generated parts of one (profile, rows, seed), made on demand: part i is the same in
    every set.

    The directory name also carries a fingerprint of the generator and writers, and the
    stored partials one of the code that computes them, so a change to either never reuses
    stale files.
    """

    def __init__(self, cache: Path, rows: int, seed: int, profile: Profile = PROFILES["demo"]) -> None:
        self.rows, self.seed, self.profile = rows, seed, profile
        gen = _fingerprint(
            profile.name,
            profile.generate,
            profile.csv,
            to_csv_bytes,
            profiles.parquet_bytes,
            profiles._rng,
            profiles._frame,
        )
        self.dir = cache / "pool" / f"{profile.name}-r{rows}-s{seed}-g{gen}"
        code = _fingerprint(
            files=(
                ROOT / "s3rollup" / "stats.py",
                ROOT / "s3rollup" / "parse.py",
                ROOT / "s3rollup" / "native" / "rollup.c",
            )
        )
        self.partials = self.dir / f"partials-c{code}"

    def csv(self, i: int) -> Path:
        return self.dir / "csv" / f"part-{i:05d}.{self.profile.csv_ext}"

    def parquet(self, i: int) -> Path:
        return self.dir / "parquet" / f"part-{i:05d}.parquet"

    def partial(self, i: int) -> Path:
        return self.partials / f"part-{i:05d}.parquet"

    def has_part(self, i: int) -> bool:
        return self.csv(i).exists() and (self.parquet(i).exists() or not self.profile.parquet)

    def ensure_part(self, i: int) -> None:
        if self.has_part(i):
            return
        import pyarrow as pa
        import pyarrow.csv as pacsv

        frame = self.profile.generate(i, self.rows, self.seed)
        body = self.profile.csv(frame)
        # Full precision: the CSV must read back bit for bit (missing cells as missing).
        back = pacsv.read_csv(
            pa.BufferReader(self.profile.read_csv_body(body)),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.float64() for c in frame.columns},
                null_values=list(DEFAULT_CONTRACT.na_values),
            ),
        ).to_pandas()
        for c in frame.columns:
            if not np.array_equal(back[c].to_numpy(), frame[c].to_numpy(np.float64), equal_nan=True):
                raise SystemExit(f"{self.profile.name}: CSV of part {i} does not round-trip column {c!r}")
        self.csv(i).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.csv(i), body)
        if self.profile.parquet:
            self.parquet(i).parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.parquet(i), profiles.parquet_bytes(frame))

    def ensure_partial(self, i: int) -> None:
        """The partial the job would have stored for part i (from its CSV, as compute_partial)."""
        if self.partial(i).exists():
            return
        from s3rollup.stats import part_partial, partial_to_parquet

        self.ensure_part(i)
        partial, _ = part_partial(self.csv(i).read_bytes(), DEFAULT_CONTRACT, "csv")
        self.partials.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.partial(i), partial_to_parquet(partial))

    def reference(self, parts: int, path: Path) -> None:
        """complex_operation over parts 0..parts-1 (pandas, all rows at once), pickled."""
        if path.exists():
            return
        from s3rollup.reference import complex_operation

        # As pandas reads the parts: a key column with missing keys is float64 (NaN).
        n = parts * self.rows
        key_type = np.float64 if self.profile.missing_keys else np.int64
        cols = {"category": np.empty(n, key_type), **{v: np.empty(n) for v in DEFAULT_CONTRACT.values}}
        for i in range(parts):
            f = self.profile.generate(i, self.rows, self.seed)
            for c, arr in cols.items():
                arr[i * self.rows : (i + 1) * self.rows] = f[c].to_numpy()
        result = complex_operation(pd.DataFrame(cols, copy=False))
        del cols
        buf = io.BytesIO()
        result.to_pickle(buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, buf.getvalue())


@dataclass
class DataSet:
    """Parts 0..parts-1 of a pool, in csv/ and parquet/ directories of their own (hard links)."""

    pool: Pool
    parts: int
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        # Named after the pool (rows, seed and generator fingerprint): a set never keeps
        # links to parts an older generator wrote.
        self.dir = self.pool.dir.parent.parent / "sets" / f"{self.parts}x{self.pool.dir.name}"

    @property
    def reference(self) -> Path:
        return self.dir / f"reference-{self.pool.dir.name.rsplit('-', 1)[-1]}.pkl"

    @property
    def formats(self) -> tuple[str, ...]:
        return ("csv", "parquet") if self.pool.profile.parquet else ("csv",)

    def _ext(self, fmt: str) -> str:
        return self.pool.profile.csv_ext if fmt == "csv" else fmt

    def files(self, fmt: str) -> list[str]:
        return [str(self.dir / fmt / f"part-{i:05d}.{self._ext(fmt)}") for i in range(self.parts)]

    def glob(self, fmt: str) -> str:
        return str(self.dir / fmt / f"*.{self._ext(fmt)}")

    def ensure(self) -> None:
        for i in range(self.parts):
            if not self.pool.has_part(i):
                say(f"  {self.pool.profile.name}: generating part {i} ({self.pool.rows:,} rows)")
            self.pool.ensure_part(i)
            _link(self.pool.csv(i), Path(self.files("csv")[i]))
            if "parquet" in self.formats:
                _link(self.pool.parquet(i), Path(self.files("parquet")[i]))
        for fmt in self.formats:
            # Nothing else may match the glob the other readers use.
            extra = set((self.dir / fmt).glob("*")) - {Path(f) for f in self.files(fmt)}
            for p in extra:
                p.unlink()
        if not self.reference.exists():
            name = self.pool.profile.name
            say(f"  {name}: pandas reference over {self.parts} parts x {self.pool.rows:,} rows")
        self.pool.reference(self.parts, self.reference)


@dataclass
class Incremental:
    """N stored partials (parts 0..N-1) and the new part N; the reference is over N+1 parts."""

    pool: Pool
    n: int
    after: DataSet = field(init=False)
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.after = DataSet(self.pool, self.n + 1)
        self.dir = (
            self.pool.dir.parent.parent
            / "incremental"
            / f"N{self.n}-{self.pool.dir.name}-{self.pool.partials.name}"
        )

    @property
    def merged(self) -> Path:
        return self.dir / "merged.parquet"

    def new_part(self, fmt: str) -> str:
        return str(self.dir / f"new-part-{self.n:05d}.{fmt}")

    def ensure(self) -> None:
        self.after.ensure()  # parts 0..N on disk and the reference over them
        for i in range(self.n):
            if not self.pool.partial(i).exists():
                say(f"  stored partial of part {i}")
            self.pool.ensure_partial(i)
        if not self.merged.exists():
            # What the job kept after publishing the N parts: the merge of their partials.
            from s3rollup.stats import merge_partials, partial_to_parquet, table_from_parquet

            merged = merge_partials(
                (table_from_parquet(self.pool.partial(i).read_bytes()) for i in range(self.n)),
                DEFAULT_CONTRACT,
            )
            _write_atomic(self.merged, partial_to_parquet(merged))
        _link(self.pool.csv(self.n), Path(self.new_part("csv")))
        _link(self.pool.parquet(self.n), Path(self.new_part("parquet")))


# ---- running one candidate --------------------------------------------------------------


@dataclass
class Run:
    """One candidate on one input: a row of the table."""

    label: str
    candidate: str
    fmt: str
    spec: dict[str, Any]
    reference: Path | None
    group: str = "main"  # main | incremental | full
    n: int = 0
    profile: str = "demo"
    seconds: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    tree_rss: list[int] = field(default_factory=list)
    maxrss: list[int] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    check: str = "not checked"

    def median(self) -> float:
        """The median of the work's seconds."""
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def process_median(self) -> float:
        """The median of the whole process's seconds."""
        return statistics.median(self.process_s) if self.process_s else float("nan")


def _tree_rss(root: psutil.Process) -> int:
    """Sum of RSS over root's descendants (not root: the wrapper's ~10 MiB are not the run's)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


def run_child(spec: dict[str, Any], log: Path, timeout: float, poll: float) -> dict[str, Any]:
    """Run bench/candidates.py in a fresh process; time it and measure its memory.

    The child runs under bench/rusage_wrap.py, a bare interpreter that starts it and
    reports ``maxrss``: getrusage(RUSAGE_CHILDREN) after waiting for it, i.e. the exact
    peak RSS of the largest single process of the child's tree. (Started straight from
    this process, the child's maxrss would start from this process's own peak.)
    ``tree_rss`` is the largest sum of RSS over the child and all its descendants,
    sampled every ``poll`` seconds with psutil: the figure for multi-process candidates.
    It can miss a spike shorter than the interval and counts shared pages once per
    process. ``process_s`` is the child's wall time, from spawn to exit (the wrapper's).
    """
    usage = Path(spec["out"]).with_suffix(".rusage.json")
    child = Path(spec.get("child", CHILD))  # another checkout's, for --baseline
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(WRAP), str(usage), sys.executable, str(child), json.dumps(spec)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=child.parent.parent,
            start_new_session=True,  # its own process group: a timeout ends all of it
        )
    ps = psutil.Process(proc.pid)
    peak, timed_out = 0, False
    while proc.poll() is None:
        peak = max(peak, _tree_rss(ps))
        if time.perf_counter() - t0 > timeout:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(poll)
    wall = time.perf_counter() - t0
    # Worker processes of a Dask cluster may outlive the child by a moment: end the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    wrapped: dict[str, Any] = json.loads(usage.read_text()) if usage.exists() else {}
    result: dict[str, Any] = {
        "rc": wrapped.get("rc", proc.returncode),
        "process_s": wrapped.get("wall", wall),
        "tree_rss": peak,
        "maxrss": wrapped.get("maxrss", 0),
        "timed_out": timed_out,
    }
    out_path = Path(spec["out"])
    if result["rc"] == 0 and out_path.exists():
        result["stages"] = json.loads(out_path.read_text())
    return result


def reference_shape(flat: pd.DataFrame) -> pd.DataFrame:
    """A result as the candidates write it (a row per group: category, <value>_<stat>,
    combined) in complex_operation's shape: (value, stat) columns by category."""
    flat = flat.sort_values("category", kind="stable")
    cols = {(v, s): flat[f"{v}_{s}"].to_numpy(np.float64) for v in VALUES for s in STATS}
    cols[("combined", "")] = flat["combined"].to_numpy(np.float64)
    out = pd.DataFrame(cols, index=pd.Index(flat["category"].to_numpy(), name="category"))
    out.columns = pd.MultiIndex.from_tuples(list(cols))
    return out


def check_frames(got: pd.DataFrame, reference: Path) -> str:
    """'ok', or what differs from the pandas reference (rtol 1e-9, NaN positions equal)."""
    exp: pd.DataFrame = pd.read_pickle(reference)  # noqa: S301 - written by this harness
    problems = compare_frames(got, exp, RTOL)
    return "ok" if not problems else "MISMATCH: " + "; ".join(problems[:3])


def check_result(path: Path, reference: Path) -> str:
    """check_frames of the result a candidate wrote (Parquet, a row per group)."""
    if not path.exists():
        return "no result"
    return check_frames(reference_shape(pd.read_parquet(path)), reference)


# ---- the plan ---------------------------------------------------------------------------


def plan(args: argparse.Namespace, tmp: Path) -> tuple[list[Run], list[str]]:
    """Prepare the data and list the runs of one repetition, in order; plus notes."""
    notes: list[str] = []
    cache = args.cache_dir
    main_pool = Pool(cache, args.rows, args.seed)
    runs: list[Run] = []
    cpus = available_cpus()
    candidates = [c for c in MAIN_CANDIDATES if c in args.candidates]
    for name in args.profiles:
        profile = PROFILES[name]
        main = DataSet(
            main_pool if name == "demo" else Pool(cache, args.rows, args.seed, profile), args.parts
        )
        say(f"data: {name}, {args.parts} parts x {args.rows:,} rows (seed {args.seed}) under {main.dir}")
        main.ensure()
        for fmt in (f for f in args.formats if f in main.formats):
            for cand in candidates:
                spec: dict[str, Any] = {
                    "candidate": cand,
                    "fmt": fmt,
                    "files": main.files(fmt),
                    "glob": main.glob(fmt),
                    # What the others are told about the data, as s3rollup's contract tells it:
                    # missing values spelled as pandas spells them.
                    "na_values": list(DEFAULT_CONTRACT.na_values) if profile.na_spelled else None,
                    "missing_keys": profile.missing_keys,
                }
                if cand == "s3rollup-engine":
                    spec["tmp"] = str(tmp)  # where its tasks store the partials
                    if args.baseline:
                        # The same candidate from another checkout's bench/ and s3rollup/.
                        runs.append(
                            Run(
                                f"s3rollup-engine@{args.baseline.name}",
                                BASELINE,
                                fmt,
                                {**spec, "child": str(args.baseline / "bench" / "candidates.py")},
                                main.reference,
                                profile=name,
                            )
                        )
                elif cand == "s3rollup-engine-no-sha256":
                    spec.update(tmp=str(tmp), sha256=False)
                elif cand == "polars+sha256":
                    spec.update(sha256=True, cpus=cpus)
                elif cand == "dask-seed":
                    spec.update(n_workers=8, threads_per_worker=2)
                elif cand == "dask-cpus":
                    spec.update(n_workers=cpus, threads_per_worker=1)
                runs.append(Run(cand, cand, fmt, spec, main.reference, profile=name))

    if "s3rollup-incremental" in args.candidates and args.incremental_n:
        rows = args.incremental_rows
        need = (max(args.incremental_n) + 1) * rows * BYTES_PER_ROW
        free = shutil.disk_usage(cache).free
        if need > free - (5 << 30):
            fit = max(1000, int((free - (5 << 30)) / BYTES_PER_ROW / (max(args.incremental_n) + 1)))
            notes.append(
                f"incremental parts use {fit:,} rows instead of {rows:,}: {need / 2**30:.1f} GiB "
                f"would not fit in {free / 2**30:.1f} GiB free"
            )
            rows = fit
        args.incremental_rows_used = rows
        pool = main_pool if rows == args.rows else Pool(cache, rows, args.seed)
        for n in args.incremental_n:
            inc = Incremental(pool, n)
            say(f"incremental data: N={n} stored partials + 1 new part, {rows:,} rows each")
            inc.ensure()
            for fmt in args.formats:
                spec = {
                    "candidate": "s3rollup-incremental",
                    "fmt": fmt,
                    "n": n,
                    "merged": str(inc.merged),
                    "new_part": inc.new_part(fmt),
                    "tmp": str(tmp),
                }
                runs.append(
                    Run(
                        f"s3rollup-incremental N={n}",
                        "s3rollup-incremental",
                        fmt,
                        spec,
                        inc.after.reference,
                        "incremental",
                        n,
                    )
                )
                if args.incremental_full:
                    after = inc.after
                    spec = {
                        "candidate": "s3rollup-engine",
                        "fmt": fmt,
                        "files": after.files(fmt),
                        "tmp": str(tmp),
                    }
                    runs.append(
                        Run(
                            f"s3rollup-engine {n + 1} parts",
                            "s3rollup-engine",
                            fmt,
                            spec,
                            after.reference,
                            "full",
                            n,
                        )
                    )
    return runs, notes


def run_e2e(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / "e2e.json"
    spec = {
        "candidate": "e2e",
        "out": str(out),
        "result": str(tmp / "e2e.pkl"),
        "n": args.e2e_n,
        "rows": args.e2e_rows,
        "seed": args.seed,
        "adds": args.e2e_adds or args.reps,
        "timeout": args.timeout,
    }
    say(f"e2e: embedded stack, {args.e2e_n} parts x {args.e2e_rows:,} rows, then +1 part x {spec['adds']}")
    res = run_child(spec, tmp / "e2e.log", args.timeout * 2, args.poll)
    if res["rc"] != 0:
        tail = (tmp / "e2e.log").read_text(errors="replace")[-2000:]
        return {"error": f"rc {res['rc']}: {tail}"}
    report = json.loads(out.read_text())
    got = pd.read_pickle(tmp / "e2e.pkl")  # noqa: S301 - written by our own child
    report["check"] = check_frames(got, tmp / "e2e.pkl.expected")
    report["tree_rss"] = res["tree_rss"]
    return report


# ---- report -----------------------------------------------------------------------------


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _s(x: float) -> str:
    return "—" if x != x else f"{x:.2f}"


def _ratio(a: float, b: float) -> str:
    return "—" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


def machine_facts() -> list[str]:
    facts = [f"- nproc (affinity): {available_cpus()}; os.cpu_count: {os.cpu_count()}"]
    facts.append(f"- s3rollup kernels: {native.kernels()} ({native.LIBRARY.name})")
    with contextlib.suppress(OSError):
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        )
        facts.append(f"- CPU: {model}")
    facts.append(f"- memory: {psutil.virtual_memory().total / 2**30:.1f} GiB")
    facts.append(f"- platform: {platform.platform()}")
    facts.append(f"- python: {sys.version.split()[0]} ({sys.executable})")
    versions = []
    for lib in LIBRARIES:
        try:
            versions.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib} (not installed)")
    facts.append("- libraries: " + ", ".join(versions))
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("OPENBLAS", "OMP_", "MKL_", "POLARS_", "DASK_", "ARROW_", "RAYON_"))
    }
    facts.append(
        "- threading env: "
        + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none set")
        + " (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are reported, never changed)"
    )
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "s3rollup"], cwd=ROOT, capture_output=True, text=True
        )
        facts.append(f"- git: {rev.stdout.strip()}{' (s3rollup/ modified)' if dirty.stdout.strip() else ''}")
    return facts


def _stage_table(runs: list[Run]) -> list[str]:
    """Median stage times of the s3rollup runs: where the engine's time goes."""
    lines = []
    keys = (
        "cluster_start",  # a --baseline from before the job's own threads: its LocalCluster's
        "tasks_start",
        "tasks_wall",
        "new_partial",
        "task_read_sum",
        "task_aggregate_sum",
        "task_encode_sum",
        "task_store_sum",
        "load_partials",
        "load_merge",
        "merge",
        "finalize",
        "cluster_close",
        "tasks_close",
        "seconds",
    )
    rows = [r for r in runs if r.candidate.startswith("s3rollup") and r.stages]
    if not rows:
        return lines
    present = [k for k in keys if any(k in s for r in rows for s in r.stages)]
    lines.append("| run | format | " + " | ".join(present) + " |")
    lines.append("|---|---|" + "---:|" * len(present))
    for r in rows:
        cells = []
        for k in present:
            vals = [s[k] for s in r.stages if k in s]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "")
        lines.append(f"| {r.profile}: {r.label} | {r.fmt} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`task_*_sum` add up the per-task times of all the parts' tasks (they run on "
        f"{available_cpus()} threads at once, so they may exceed `tasks_wall`), the steps of "
        "`job.part_result`: `read` is the file's bytes into memory with their SHA-256, "
        "`aggregate` is `stats.part_partial` (parse and aggregate; "
        f"kernels: {native.kernels()}), `encode` the partial to Parquet and its SHA-256, "
        "`store` writing it to a file (the job PUTs it) and keeping its table "
        "(`job.kept_partials`). `load_merge`: the kept partials, or else the stored ones "
        "read back and checked, merged (`job.fetch_in_order`, `stats.merge_partials`).",
    ]
    return lines


def render(
    args: argparse.Namespace,
    runs: list[Run],
    notes: list[str],
    e2e: dict[str, Any] | None,
    started: datetime,
    load: tuple[list[float], list[float]],
) -> str:
    lines = [
        f"# s3rollup benchmark: {args.parts} parts x {args.rows:,} rows ({args.parts * args.rows:,} rows)",
        "",
    ]
    lines.append(
        f"- run: {started:%Y-%m-%d %H:%M} UTC, {args.reps} repetition(s), interleaved, "
        "one fresh process per run"
    )
    lines.append(f"- command: `{shlex.join([sys.executable, *sys.argv])}`")
    lines.append(
        f"- load average before / after: {' '.join(f'{x:.2f}' for x in load[0])} / "
        f"{' '.join(f'{x:.2f}' for x in load[1])}"
    )
    lines += machine_facts()
    for note in notes:
        lines.append(f"- note: {note}")
    lines += ["", "## Full computation: the whole process (headline) and the work", ""]
    lines.append(
        "`process s`: the child process from spawn to exit, as a job's process runs: interpreter "
        "start, imports, the work, writing the result (a Parquet file, each with its own library) "
        "and exit. `work s`: the work alone, timed inside the child with its libraries already "
        "imported (cluster start and shutdown included, writing the result not). Ratios are of "
        "medians on the same profile and format, above 1x slower than the other; `vs` columns "
        "compare whole processes. Peak RSS: sum over the child's process tree, sampled every "
        f"{args.poll:g}s (psutil); `maxrss`: largest single process, exact "
        "(getrusage(RUSAGE_CHILDREN) in bench/rusage_wrap.py)."
    )
    if args.slow_reps < args.reps:
        lines.append(
            f"{', '.join(SLOW_CANDIDATES)} ran in {args.slow_reps} of the {args.reps} repetitions "
            "(spread over them), the others in every one: column `n`."
        )
    lines.append("")
    lines.append(
        "| profile | format | candidate | process s | min-max | work s | vs polars | vs polars+sha256 "
        "| vs dask-seed | work vs polars | peak RSS MiB (tree) | maxrss MiB | n | check |"
    )
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    main_runs = [r for r in runs if r.group == "main"]
    proc = {(r.profile, r.candidate, r.fmt): r.process_median() for r in main_runs}
    work = {(r.profile, r.candidate, r.fmt): r.median() for r in main_runs}
    for r in main_runs:
        lines.append(_main_row(r, proc, work))
    lines += ["", *_targets(args, main_runs, proc), "", "Profiles:", ""]
    lines += [f"- `{name}`: {PROFILES[name].about}" for name in args.profiles]
    lines.append("")

    inc = [r for r in runs if r.group in ("incremental", "full")]
    if inc:
        rows_used = getattr(args, "incremental_rows_used", args.incremental_rows)
        lines += ["## Incremental: one new part on top of N stored partials", ""]
        lines.append(
            f"Parts of {rows_used:,} rows. `s3rollup-incremental`: start the job's cluster, compute "
            "the new part's partial and store it, read the merge the job kept of the N parts and "
            "the new partial (bytes, sha256, Parquet), merge, finalize. Against it: the full "
            "engine over the same N+1 parts, and "
            f"the main `s3rollup-engine` run ({args.parts} x {args.rows:,})."
        )
        lines.append("")
        lines.append(
            "| run | format | median s | min s | max s | process s | peak RSS MiB (tree) | maxrss MiB "
            "| check |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in inc:
            lines.append(_row(r))
        lines += [
            "",
            "| N | format | incremental s | full engine over N+1 parts s | incremental / full(N+1) "
            f"| incremental / s3rollup-engine ({args.parts} parts) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in inc:
            if r.group != "incremental":
                continue
            full = next((f for f in inc if f.group == "full" and f.n == r.n and f.fmt == r.fmt), None)
            fm = full.median() if full else float("nan")
            em = work.get(("demo", "s3rollup-engine", r.fmt), float("nan"))
            lines.append(
                f"| {r.n} | {r.fmt} | {_s(r.median())} | {_s(fm)} | {_ratio(r.median(), fm)} "
                f"| {_ratio(r.median(), em)} |"
            )
        lines.append("")

    stage = _stage_table(runs)
    if stage:
        lines += ["## Where the s3rollup time goes (median seconds per stage)", "", *stage, ""]

    dask_where = {s.get("combined_where") for r in runs if r.candidate.startswith("dask") for s in r.stages}
    dask_where.discard(None)
    if dask_where:
        lines.append(
            "Dask: `s3rollup.reference.complex_operation` assigns `result[('combined', '')]`, which "
            "dask refuses (NotImplementedError: item assignment with a tuple); the candidates run the "
            "seed's own `result['combined'] = ...` instead. `combined` computed in: "
            f"{', '.join(sorted(dask_where))}."
        )
        lines.append("")

    if e2e is not None:
        lines += ["## End to end through the embedded stack", ""]
        if "error" in e2e:
            lines.append(f"failed: {e2e['error']}")
        else:
            adds = e2e["adds"]
            lines.append(
                f"moto server on 127.0.0.1; {e2e['n']} parts x {e2e['rows']:,} rows uploaded and aggregated "
                f"first ({e2e['initial']:.1f}s, stack start {e2e['stack_start']:.1f}s); "
                "then one more part at a time: upload -> manifest listing it (ingest handler, "
                "worker subprocess `python -m s3rollup.job`, its cluster, the partial, merge, "
                "publish). Each addition grows N by one."
            )
            lines.append("")
            lines.append(
                "| N before | upload s | upload -> manifest s | upload -> worker exit s "
                "| Job.run s (audit JOB_FINISHED) |"
            )
            lines.append("|---:|---:|---:|---:|---:|")
            for a in adds:
                lines.append(
                    f"| {a['n_before']} | {a['upload']:.2f} | {a['to_manifest']:.2f} "
                    f"| {a['worker_exit']:.2f} | {_s(float(a.get('job_run') or 'nan'))} |"
                )
            meds = statistics.median(a["to_manifest"] for a in adds)
            lines.append("")
            lines.append(
                f"Median upload -> manifest: {meds:.2f}s; peak RSS of the whole tree "
                f"(stack + workers): {_mib(e2e['tree_rss'])} MiB; result check: {e2e['check']}."
            )
        lines.append("")

    failures = [(r, f) for r in runs for f in r.failures]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {r.profile}: {r.label} ({r.fmt}): {f}" for r, f in failures]
        lines.append("")
    lines += [
        "## Raw seconds per repetition",
        "",
        "| run | format | process s | work s |",
        "|---|---|---|---|",
    ]
    for r in runs:
        proc_s, work_s = (", ".join(f"{x:.2f}" for x in xs) for xs in (r.process_s, r.seconds))
        lines.append(f"| {r.profile}: {r.label} | {r.fmt} | {proc_s} | {work_s} |")
    return "\n".join(lines) + "\n"


def _main_row(
    r: Run, proc: dict[tuple[str, str, str], float], work: dict[tuple[str, str, str], float]
) -> str:
    """A row of the headline table: whole process first, the work beside it."""
    head = [r.profile, r.fmt, r.label if r.check == "ok" else f"**{r.label}** (!)"]
    if not r.process_s:
        return "| " + " | ".join([*head, "FAILED", *[""] * 9, r.check]) + " |"

    def vs(other: str, table: dict[tuple[str, str, str], float]) -> str:
        return _ratio(
            table[(r.profile, r.candidate, r.fmt)], table.get((r.profile, other, r.fmt), float("nan"))
        )

    cells = [
        _s(r.process_median()),
        f"{min(r.process_s):.2f}-{max(r.process_s):.2f}",
        _s(r.median()),
        vs("polars", proc),
        vs("polars+sha256", proc),
        vs("dask-seed", proc),
        vs("polars", work),
        _mib(statistics.median(r.tree_rss)),
        _mib(statistics.median(r.maxrss)),
        str(len(r.process_s)),
    ]
    return "| " + " | ".join([*head, *cells, r.check]) + " |"


def _targets(args: argparse.Namespace, runs: list[Run], proc: dict[tuple[str, str, str], float]) -> list[str]:
    """s3rollup's performance targets, per profile, from the whole-process medians."""

    def ratio(profile: str, a: str, b: str, fmt: str, limit: float, above: bool = False) -> str:
        x, y = proc.get((profile, a, fmt), float("nan")), proc.get((profile, b, fmt), float("nan"))
        if not (x == x and y == y and y > 0):
            return "—"
        met = x / y >= limit if above else x / y <= limit
        return f"{x / y:.2f}x {'met' if met else 'MISSED'}"

    lines = [
        "## Targets: whole process, medians",
        "",
        "| profile | CSV: s3rollup / polars (<= 1.0x) | CSV: dask-seed / s3rollup (>= 10x) "
        "| CSV: dask-seed / s3rollup without its SHA-256 (the SHA-256's cost) "
        "| Parquet: s3rollup / polars+sha256 (<= 1.0x) | Parquet: s3rollup / polars "
        "| s3rollup peak RSS MiB, tree (<= 1,024 on groups100k) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for profile in args.profiles:
        rss = [
            max(r.tree_rss)
            for r in runs
            if r.profile == profile and r.candidate == "s3rollup-engine" and r.tree_rss
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    profile,
                    ratio(profile, "s3rollup-engine", "polars", "csv", 1.0),
                    ratio(profile, "dask-seed", "s3rollup-engine", "csv", 10.0, above=True),
                    ratio(profile, "dask-seed", "s3rollup-engine-no-sha256", "csv", float("inf")).replace(
                        " met", ""
                    ),
                    ratio(profile, "s3rollup-engine", "polars+sha256", "parquet", 1.0),
                    ratio(profile, "s3rollup-engine", "polars", "parquet", float("inf")).replace(" met", ""),
                    _mib(max(rss)) if rss else "—",
                ]
            )
            + " |"
        )
    return lines


def _row(r: Run) -> str:
    """A row of the incremental table (the work's seconds first)."""
    if not r.seconds:
        return "| " + " | ".join([r.label, r.fmt, "FAILED", "", "", "", "", "", r.check]) + " |"
    label = r.label if r.check == "ok" else f"**{r.label}** (!)"
    cells = [
        label,
        r.fmt,
        _s(r.median()),
        _s(min(r.seconds)),
        _s(max(r.seconds)),
        _s(r.process_median()),
        _mib(statistics.median(r.tree_rss)),
        _mib(statistics.median(r.maxrss)),
    ]
    return "| " + " | ".join([*cells, r.check]) + " |"


# ---- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark s3rollup's engine and incremental path against pandas, Dask, Polars and "
        "DuckDB on generated seed-schema parts (CSV and Parquet), side by side in one run.",
    )
    p.add_argument("--parts", type=int, default=20, help="parts of the main data set (default 20)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per part (default 1,000,000)")
    p.add_argument("--seed", type=int, default=42, help="data seed, as s3rollup demo (default 42)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, interleaved (default 3)")
    p.add_argument(
        "--slow-reps",
        type=int,
        help="repetitions of " + ", ".join(SLOW_CANDIDATES) + ", spread over the others (default --reps)",
    )
    p.add_argument("--formats", default="csv,parquet", help="comma-separated: csv, parquet (default both)")
    p.add_argument(
        "--profiles",
        default=",".join(PROFILES),
        help="comma-separated data profiles (default all): "
        + "; ".join(f"{k}: {v.about}" for k, v in PROFILES.items()).replace("%", "%%"),
    )
    p.add_argument(
        "--candidates",
        default=",".join([*MAIN_CANDIDATES, "s3rollup-incremental"]),
        help="comma-separated subset of: " + ", ".join([*MAIN_CANDIDATES, "s3rollup-incremental"]),
    )
    p.add_argument(
        "--incremental-n", default="20,100", help="stored partials N to add one part to (default 20,100)"
    )
    p.add_argument(
        "--incremental-rows", type=int, default=1_000_000, help="rows per part there (default 1,000,000)"
    )
    p.add_argument(
        "--no-incremental-full",
        dest="incremental_full",
        action="store_false",
        help="skip the full engine over the N+1 parts (the incremental ratio's denominator)",
    )
    p.add_argument("--e2e", action="store_true", help="also time +1 part through the embedded stack (slow)")
    p.add_argument(
        "--e2e-n", type=int, default=20, help="parts already aggregated in the e2e run (default 20)"
    )
    p.add_argument("--e2e-rows", type=int, default=100_000, help="rows per e2e part (default 100,000)")
    p.add_argument("--e2e-adds", type=int, default=0, help="parts added one by one in e2e (default --reps)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the harness: 4 x 50,000 rows, 1 rep, CSV, no dask-seed, incremental N=4; "
        "options given explicitly win; result under .bench-cache/results",
    )
    p.add_argument(
        "--baseline",
        type=lambda x: Path(x).resolve(),
        help="another s3rollup checkout (e.g. `git archive` of an earlier commit, its native kernels "
        "built) whose s3rollup-engine runs beside this one's, labelled by the directory's name",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=ROOT / ".bench-cache", help="data cache (default .bench-cache)"
    )
    p.add_argument(
        "--out", type=Path, help="result file (default bench/results/<UTC date>-<parts>x<rows>.md)"
    )
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a run is killed (default 1800)"
    )
    p.add_argument("--poll", type=float, default=0.1, help="RSS sampling interval, seconds (default 0.1)")
    args = p.parse_args(argv)
    if args.quick:
        # Only what was not given explicitly: `--quick --formats csv,parquet` checks both.
        words = sys.argv[1:] if argv is None else argv
        given = {
            a.dest
            for a in p._actions
            for o in a.option_strings
            for w in words
            if w == o or w.startswith(o + "=")
        }
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not set(args.formats) <= {"csv", "parquet"}:
        p.error("--formats: csv and/or parquet")
    args.slow_reps = args.reps if args.slow_reps is None else max(1, min(args.slow_reps, args.reps))
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    unknown_profiles = set(args.profiles) - set(PROFILES)
    if unknown_profiles or not args.profiles:
        p.error(f"--profiles: some of {', '.join(PROFILES)}")
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(args.candidates) - {*MAIN_CANDIDATES, "s3rollup-incremental"}
    if unknown:
        p.error(f"unknown candidates: {', '.join(sorted(unknown))}")
    args.incremental_n = [int(x) for x in str(args.incremental_n).split(",") if x.strip()]
    return args


def byte_compile(root: Path) -> None:
    """Compile a checkout's s3rollup/ and bench/ to bytecode, as the worker image compiles
    s3rollup (worker/Dockerfile): where PYTHONDONTWRITEBYTECODE is set (on this host, and in
    the image) a candidate would otherwise compile them from source in every process,
    about 40 ms that no job pays."""
    for d in ("s3rollup", "bench"):
        compileall.compile_dir(str(root / d), quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for root in (ROOT, *([args.baseline] if args.baseline else [])):
        byte_compile(root)
    started = datetime.now(UTC)
    load_before = list(os.getloadavg())
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    runs, notes = plan(args, work)
    say(f"{len(runs)} runs x {args.reps} repetition(s); logs in {work}")
    slow_reps = {round(i * args.reps / args.slow_reps) for i in range(args.slow_reps)}
    for rep in range(args.reps):
        for k, r in enumerate(runs):
            if r.candidate in SLOW_CANDIDATES and rep not in slow_reps:
                continue
            tag = f"{k:02d}-{r.label.replace(' ', '_').replace('=', '')}-{r.fmt}-rep{rep}"
            # Every run writes its result, as a job does: part of the whole process's time.
            spec = {**r.spec, "out": str(work / f"{tag}.json"), "result": str(work / f"{tag}.parquet")}
            res = run_child(spec, work / f"{tag}.log", args.timeout, args.poll)
            if res["rc"] != 0 or "stages" not in res:
                tail = (work / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
                why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
                r.failures.append(f"rep {rep}: {why}: {' | '.join(tail)}")
                say(f"rep {rep + 1}/{args.reps} {r.profile:<10} {r.label:<28} {r.fmt:<8} FAILED ({why})")
                continue
            r.seconds.append(res["stages"]["seconds"])
            r.process_s.append(res["process_s"])
            r.tree_rss.append(res["tree_rss"])
            r.maxrss.append(res["maxrss"])
            r.stages.append(res["stages"])
            keep = False
            if r.check == "not checked" and r.reference is not None:  # once per run
                r.check = check_result(Path(spec["result"]), r.reference)
                keep = r.check != "ok"  # stays beside the run's log
            if not keep:
                Path(spec["result"]).unlink(missing_ok=True)
            say(
                f"rep {rep + 1}/{args.reps} {r.profile:<10} {r.label:<28} {r.fmt:<8} "
                f"{res['stages']['seconds']:7.2f}s "
                f"(process {res['process_s']:.2f}s, tree {_mib(res['tree_rss'])} MiB) {r.check}"
            )
    e2e = run_e2e(args, work) if args.e2e else None
    load_after = list(os.getloadavg())
    text = render(args, runs, notes, e2e, started, (load_before, load_after))
    print(text)
    out = args.out
    if out is None:
        base = (args.cache_dir / "results") if args.quick else RESULTS
        out = base / f"{started:%Y-%m-%d}-{args.parts}x{args.rows}.md"
        k = 2
        while out.exists():
            out = base / f"{started:%Y-%m-%d}-{args.parts}x{args.rows}-{k}.md"
            k += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    raw = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [
            {
                k: getattr(r, k)
                for k in (
                    "label",
                    "profile",
                    "candidate",
                    "fmt",
                    "group",
                    "n",
                    "seconds",
                    "process_s",
                    "tree_rss",
                    "maxrss",
                    "stages",
                    "failures",
                    "check",
                )
            }
            for r in runs
        ],
        "e2e": e2e,
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    say(f"written: {out} (+ .json with every repetition)")
    # Another engine's numbers that differ from pandas' are a finding the report shows
    # (the seed's Dask variance on `offset`), not a failure of this run; s3rollup's are.
    failed = any(
        r.failures or (r.seconds and r.check != "ok" and r.candidate.startswith("s3rollup")) for r in runs
    )
    if failed:
        say(f"some runs failed or s3rollup disagrees with pandas: their logs stay in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
