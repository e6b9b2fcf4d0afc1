"""The GPU check's benchmark (scripts/gpu_check.sh): every zoo model at two batch sizes and
real-width Hugging Face models, run as jobs in parallel processes within a deadline.

    python -m fxclip.tools.bench.gpu run WORK_DIR OUT_DIR --deadline SECONDS [--quick] [--device cuda]
    python -m fxclip.tools.bench.gpu job JOB_JSON WORK_DIR OUT_DIR          (one job; run starts these)
    python -m fxclip.tools.bench.gpu report OUT_DIR                         (benchmark.json, benchmark.md)

Compiling is most of a job's time (tens of seconds per graph on a cold cache) and uses the CPU,
timing uses the GPU: each job builds, compiles and checks all its methods by itself, then takes
the GPU lock (a file lock in WORK_DIR) only for its timed steps, so compiles overlap other jobs'
timing and no two jobs are timed at once. Peak memory is per process
(torch.cuda.max_memory_allocated around one step) and needs no lock. Each finished job appends its
rows to OUT_DIR/rows.jsonl at once, so a job killed at the deadline loses only itself; `report`
makes benchmark.json ({gpu, torch, commit, rows: [{model, batch, dtype, method, ms, vs_floor,
speedup_over_naive, peak_mb, correct}], details}) and benchmark.md from them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROW_KEYS = ("model", "batch", "dtype", "method", "ms", "vs_floor", "speedup_over_naive", "peak_mb", "correct")
ROWS = "rows.jsonl"

ZOO_METHODS_128 = ["floor", "floor_compiled", "fxclip", "fxclip_compiled", "fxclip_compiled_nographs", "naive", "vmap",
                   "vmap_compiled", "opacus_hooks", "opacus_ghost"]
ZOO_METHODS_1024 = ["floor", "floor_compiled", "fxclip", "fxclip_compiled", "fxclip_compiled_mpbs256", "vmap",
                    "vmap_compiled", "opacus_hooks", "opacus_ghost"]
HF_METHODS = ["floor", "fxclip", "fxclip_compiled", "opacus_ghost"]
HF_CHECK_EXAMPLES = 4  # the reference (one backward per example) runs on the batch's first examples
HF_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}  # of the clipped sum, relative to its largest entry


def jobs(quick: bool) -> list[dict]:
    """Every job, in the order they start: the Hugging Face models (real width; tiny in quick
    mode) first, since each compiles for minutes (run_all starts at most max_hf at once, so the
    zoo at B=128, the paper's setting, fills the other workers from the start), then the zoo at
    B=1024 (memory)."""
    from fxclip.zoo import ZOO

    from .methods import WARMUP_STEPS

    if quick:  # a CPU dry run: every code path once, small
        return (
            [{"kind": "zoo", "model": m, "batch": 16, "methods": ZOO_METHODS_128, "reps": 2, "warmup": 1} for m in ("mlp", "small_cnn")]
            + [{"kind": "hf", "model": m, "dtype": d, "tiny": True, "methods": HF_METHODS if m == "hf_gpt2" else ["floor", "fxclip"], "reps": 2}
               for m in ("hf_gpt2", "hf_bert", "hf_vit", "hf_gpt2_lora") for d in ("float32", "bfloat16")]
            + [{"kind": "zoo", "model": "bow", "batch": 32, "methods": ZOO_METHODS_1024, "reps": 2, "warmup": 1}]
        )
    hf = [{"kind": "hf", "model": m, "dtype": d, "tiny": False, "methods": HF_METHODS, "reps": 5}
          for m in ("hf_gpt2", "hf_bert", "hf_vit", "hf_gpt2_lora") for d in ("float32", "bfloat16")]
    return (
        hf
        + [{"kind": "zoo", "model": m, "batch": 128, "methods": ZOO_METHODS_128, "reps": 20, "warmup": WARMUP_STEPS} for m in ZOO]
        + [{"kind": "zoo", "model": m, "batch": 1024, "methods": ZOO_METHODS_1024, "reps": 10, "warmup": WARMUP_STEPS} for m in ZOO]
    )


def job_name(job: dict) -> str:
    return f"{job['model']}-{job.get('batch', job.get('dtype'))}-{job.get('dtype', 'float32')}"


# ---- one job -----------------------------------------------------------------------------------

@contextlib.contextmanager
def gpu_lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_rows(out_dir: Path, rows: list[dict]) -> None:
    with open(out_dir / ROWS, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def _row(model, batch, dtype, method, seconds, peak_bytes, check, first_call=None, skipped=None) -> dict:
    """A raw row: `report` adds vs_floor and speedup_over_naive from the other rows."""
    return {
        "model": model, "batch": batch, "dtype": dtype, "method": method,
        "ms": None if seconds is None else seconds * 1e3,
        "peak_mb": None if peak_bytes is None else peak_bytes / 2**20,
        "correct": None if check == "n/a" or skipped else check == "ok",
        "check": check, "first_call_s": first_call, "skipped": skipped,
    }


def run_zoo_job(job: dict, device: torch.device, lock) -> list[dict]:
    from .runner import run_cells

    cells = run_cells(job["model"], job["batch"], job["methods"], job["reps"], job["warmup"], device,
                      memory=device.type == "cuda", exclusive=lock)
    return [_row(c.model, c.batch, "float32", c.method, c.seconds, c.peak_bytes, c.check, c.first_call_seconds, c.skipped)
            for c in cells]


def run_hf_job(job: dict, device: torch.device, lock) -> list[dict]:
    """One Hugging Face model in one dtype: the non-private step, fxclip eager and compiled,
    Opacus ghost clipping; each private method's clipped sum on the batch's first examples
    checked against one backward per example (under the same autocast), then timed on the batch."""
    import copy
    import statistics

    from ...peak import peak_memory
    from fxclip.reference import clipped_sum, naive_per_example_grads
    from .hf import HF_MODELS, HF_TINY
    from .runner import _first_line, _sync

    entry = (HF_TINY if job["tiny"] else HF_MODELS)[job["model"]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = entry.factory().to(device)
    inputs, targets = entry.make_batch(entry.batch, torch.Generator().manual_seed(0))
    batch = (tuple(x.to(device) for x in inputs), targets.to(device))
    few = (tuple(x[:HF_CHECK_EXAMPLES] for x in batch[0]), batch[1][:HF_CHECK_EXAMPLES])

    def autocast():
        if job["dtype"] == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with autocast():
        expected = clipped_sum(naive_per_example_grads(base, entry.loss_fn, *few), 1.0)[1]
    scale = max(float(e.abs().max()) for e in expected.values())
    rows, ready = [], {}
    for name in job["methods"]:
        try:
            start = time.perf_counter()
            with autocast():
                step, grads = _hf_method(name, copy.deepcopy(base), entry.loss_fn, few)
                step()
            _sync(device)
            first_call = time.perf_counter() - start
            check = "n/a"
            if grads is not None:
                got = grads()
                worst = max(float((got[k].float().reshape(e.shape) - e.float()).abs().max()) for k, e in expected.items())
                check = "ok" if worst <= HF_RTOL[job["dtype"]] * scale else f"WRONG (max error {worst:.2e}, scale {scale:.2e})"
            with autocast():
                timed, _ = _hf_method(name, copy.deepcopy(base), entry.loss_fn, batch, reuse=step)
                timed()  # the whole batch once untimed (fxclip compiled: the same graph, batch symbolic)
            ready[name] = (timed, check, first_call)
        except Exception as e:  # a method failing on a model is a result
            rows.append(_row(job["model"], entry.batch, job["dtype"], name, None, None, "n/a", skipped=_first_line(e)))
            print(f"{name}: {_first_line(e)}", file=sys.stderr)
    times = {name: [] for name in ready}
    with lock():
        for _ in range(job["reps"]):
            for name, (timed, _, _) in ready.items():
                _sync(device)
                start = time.perf_counter()
                with autocast():
                    timed()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    for name, (timed, check, first_call) in ready.items():
        with autocast():
            peak = peak_memory(timed, device) if device.type == "cuda" else None
        rows.append(_row(job["model"], entry.batch, job["dtype"], name, statistics.median(times[name]), peak, check, first_call))
    return rows


def _hf_method(name: str, model, loss_fn, data, reuse=None):
    """(step, grads) of method `name` on `data` = (inputs, targets): `step()` does one step's
    gradient work, `grads()` returns the clipped sum it wrote (None for the floor). With `reuse`
    (an earlier step of the floor or fxclip), the new step runs the same model and transform (and
    compiled step) on `data`; a peer wraps `model`, a fresh copy, again."""
    from fxclip.api import transform
    from .methods import METHODS, _param_grads, _zero

    inputs, targets = data
    if reuse is not None and not name.startswith("opacus"):
        model, private = reuse.model, reuse.private
    if name == "floor":
        def step():
            _zero(model)
            loss_fn(model(*inputs), targets).sum().backward()
        step.model, step.private = model, None
        return step, None
    if name in ("fxclip", "fxclip_compiled"):
        if reuse is None:
            private = transform(model, loss_fn, 1.0, compile=name == "fxclip_compiled")

        def step():
            _zero(model)
            private.step(inputs, targets)
        step.model, step.private = model, private
        return step, lambda: _param_grads(model)
    method = METHODS[name](model, loss_fn, 1.0, inputs, targets)
    return method.step, method.grads


def run_job(job: dict, out_dir: Path, work_dir: Path, device: torch.device) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = lambda: gpu_lock(work_dir / "gpu.lock")  # noqa: E731
    rows = (run_zoo_job if job["kind"] == "zoo" else run_hf_job)(job, device, lock)
    append_rows(out_dir, rows)
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f} ms"
        print(f"{r['model']} {r['batch']} {r['dtype']} {r['method']}: {ms} {r['check']} {r['skipped'] or ''}")


# ---- all jobs, in parallel, within a deadline ------------------------------------------------------

def run_all(work_dir: Path, out_dir: Path, deadline: float, quick: bool, device: str, workers: int,
            max_hf: int, log, only: Sequence[str] = ()) -> None:
    """Runs `jobs(quick)` (those whose names contain one of `only`, if given) as subprocesses,
    `workers` at a time (at most `max_hf` Hugging Face jobs: their steps hold GBs), until
    `deadline` (time.time()); a job still running then is killed. Writes each job's duration,
    exit status and output tail to `log`."""
    pending = [j for j in jobs(quick) if not only or any(part in job_name(j) for part in only)]
    running: dict[str, tuple] = {}
    work_dir.mkdir(parents=True, exist_ok=True)

    def stop(signum, frame):  # killed from outside (the script's timeout): the jobs go too
        for proc, *_ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    while pending or running:
        now = time.time()
        for name, (proc, started, path, job) in list(running.items()):
            if proc.poll() is not None or now > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    status = "KILLED at the deadline"
                else:
                    status = f"exit {proc.returncode}"
                tail = path.read_text(errors="replace").splitlines()[-12:]
                log(f"job {name}: {status} after {now - started:.0f} s\n" + "\n".join("    " + t for t in tail))
                del running[name]
        if now > deadline:
            log("deadline reached; not started: " + ", ".join(job_name(j) for j in pending))
            return
        hf_running = sum(1 for *_, job in running.values() if job["kind"] == "hf")
        while pending and len(running) < workers:
            job = next((j for j in pending if j["kind"] != "hf" or hf_running < max_hf), None)
            if job is None:
                break
            pending.remove(job)
            hf_running += job["kind"] == "hf"
            name = job_name(job)
            path = work_dir / f"{name}.log"
            env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "4" if job["kind"] == "hf" else "2"}
            cmd = [sys.executable, "-m", "fxclip.tools.bench.gpu", "job", json.dumps(job), str(work_dir), str(out_dir), "--device", device]
            with open(path, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running[name] = (proc, time.time(), path, job)
        time.sleep(0.5)


# ---- the report ------------------------------------------------------------------------------------

def read_rows(out_dir: Path) -> list[dict]:
    path = out_dir / ROWS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def with_ratios(raw: list[dict]) -> list[dict]:
    """The rows of benchmark.json: each raw row's ROW_KEYS, with vs_floor (ms / the eager
    non-private step's ms, same model, batch and dtype) and speedup_over_naive (naive ms / ms)."""
    by = {(r["model"], r["batch"], r["dtype"], r["method"]): r for r in raw}
    rows = []
    for r in raw:
        floor = by.get((r["model"], r["batch"], r["dtype"], "floor"), {}).get("ms")
        naive = by.get((r["model"], r["batch"], r["dtype"], "naive"), {}).get("ms")
        ms = r["ms"]
        rows.append({
            **{k: r.get(k) for k in ROW_KEYS},
            "vs_floor": ms / floor if ms and floor else None,
            "speedup_over_naive": naive / ms if ms and naive else None,
        })
    return rows


def report(out_dir: Path, meta: dict) -> dict:
    """benchmark.json and benchmark.md in `out_dir` from its rows.jsonl; returns the JSON."""
    raw = read_rows(out_dir)
    result = {
        "gpu": meta["gpu"], "torch": meta["torch"], "commit": meta["commit"],
        "rows": with_ratios(raw),
        "details": [{k: r.get(k) for k in ("model", "batch", "dtype", "method", "check", "first_call_s", "skipped")} for r in raw],
    }
    (out_dir / "benchmark.json").write_text(json.dumps(result, indent=1))
    (out_dir / "benchmark.md").write_text(markdown(result))
    return result


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    out = [f"GPU: {result['gpu']}; torch {result['torch']}; commit {result['commit']}", "",
           "Step time (median), relative to the eager non-private step of the same model, batch and dtype "
           "(vs floor), speed-up over the naive per-example loop, peak memory of one step "
           "(torch.cuda.max_memory_allocated above what was held before it), and the clipped sum checked "
           "against the reference. fxclip_compiled_mpbs256: max_physical_batch_size=256; "
           "fxclip_compiled_graphs: cuda_graphs=True (its graphs' memory pool is held between steps).", "",
           "| model | batch | dtype | method | ms | vs floor | over naive | peak MB | correct |",
           "|---|---|---|---|---|---|---|---|---|"]
    details = {(d["model"], d["batch"], d["dtype"], d["method"]): d for d in result["details"]}
    for r in result["rows"]:
        d = details.get((r["model"], r["batch"], r["dtype"], r["method"]), {})
        correct = {True: "ok", False: "WRONG", None: "-"}[r["correct"]]
        ms = _num(r["ms"], ".2f") if not d.get("skipped") else "skipped"
        out.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['method']} | {ms} | {_num(r['vs_floor'], '.2f')} | "
                   f"{_num(r['speedup_over_naive'], '.1f')} | {_num(r['peak_mb'], '.1f')} | {correct} |")
    notes = [d for d in result["details"] if d.get("skipped") or (d.get("check") or "").startswith("WRONG")]
    if notes:
        out += ["", "Skipped or wrong:", ""] + [
            f"- {d['model']} {d['batch']} {d['dtype']} {d['method']}: {d.get('skipped') or d['check']}" for d in notes]
    return "\n".join(out) + "\n"


def machine_meta(device: str) -> dict:
    """gpu (the card's name, or the CPU on a dry run), torch, commit (FXCLIP_COMMIT)."""
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"none (CPU dry run: {platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "commit": os.environ.get("FXCLIP_COMMIT", "unknown")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxclip.tools.bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("work_dir", type=Path)
    run.add_argument("out_dir", type=Path)
    run.add_argument("--deadline", type=float, required=True, help="seconds from now")
    run.add_argument("--quick", action="store_true")
    run.add_argument("--device", default="cuda")
    run.add_argument("--workers", type=int, default=8)  # 16 cores: two compile threads each
    run.add_argument("--max-hf", type=int, default=3)
    run.add_argument("--only", nargs="*", default=[], help="run only the jobs whose names contain one of these")
    job = sub.add_parser("job")
    job.add_argument("job")
    job.add_argument("work_dir", type=Path)
    job.add_argument("out_dir", type=Path)
    job.add_argument("--device", default="cuda")
    rep = sub.add_parser("report")
    rep.add_argument("out_dir", type=Path)
    rep.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "run":
        def log(text: str) -> None:
            print(text, flush=True)

        run_all(args.work_dir, args.out_dir, time.time() + args.deadline, args.quick, args.device, args.workers, args.max_hf, log, args.only)
    elif args.command == "job":
        run_job(json.loads(args.job), args.out_dir, args.work_dir, torch.device(args.device))
    else:
        result = report(args.out_dir, machine_meta(args.device))
        print(f"{len(result['rows'])} rows -> {args.out_dir / 'benchmark.json'}, benchmark.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
