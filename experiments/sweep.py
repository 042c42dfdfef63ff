"""Sweeps: expand a grid of experiment flags, run each job locally (K at a time), resume unfinished jobs on
restart, collect every job's final metrics into one table (markdown) + JSON; or write each job's multi-host
launch command for a GPU cluster (Slurm) or a TPU slice (no cloud access needed to generate them).

    python experiments/sweep.py --grid grid.yaml --workdir runs/sweep [--parallel 2]
    python experiments/sweep.py --grid grid.yaml --workdir runs/sweep --collect-only
    python experiments/sweep.py --grid grid.yaml --workdir /shared/sweep --print-launch slurm --nodes 4
    python experiments/sweep.py --grid grid.yaml --workdir gs://bucket/sweep --print-launch tpu --nodes 8 \\
        --tpu-name my-v5p-64 --zone us-east5-a

The grid (YAML, or JSON, which YAML reads too; PyYAML comes with flax):

    script: experiments/train_denoiser.py      # run as `python SCRIPT --flag=value ...`
    flags:                                     # the same for every job
      context_checkpoint: runs/ar/checkpoint
      steps: 400
    grid:                                      # crossed: one job per combination (a list of such
      peak_lr: [1.0e-3, 3.0e-4]                #   mappings: the union of their crosses)
      block_size: [8, 16]
    workdir_flag: workdir                      # the flag that gets each job's directory (default)
    metrics_file: metrics.jsonl                # in the job directory: JSON lines, the last record is
                                               #   the final metrics (a .json file: taken whole)
    report: [loss, masked_accuracy]            # metric columns of the table (default: all)
    env: {XLA_FLAGS: ...}                      # extra environment of each job (optional)

Each job runs in WORKDIR/jobs/NAME (NAME from its grid values, e.g. `block_size=8,peak_lr=0.001`), with
its output in `log.txt`. A job that exits 0 gets `final_metrics.json` (the last record of its metrics
file): on restart, jobs that have one are skipped and the others run again with the same directory,
where the training scripts resume from their checkpoint. Killing the sweep (SIGINT/SIGTERM) stops its
jobs. Results: WORKDIR/results.md and WORKDIR/results.json.

Multi-host launches pass `--coordinator_address --num_processes --process_id` (jax.distributed) to the
script; `--print-launch` writes them to WORKDIR/launch_{slurm,tpu}.sh and prints them.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

FINAL_METRICS = "final_metrics.json"
JOB_FILE = "job.json"
LOG_FILE = "log.txt"
JOBS_DIR = "jobs"
DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")
GRID_KEYS = {"script", "flags", "grid", "workdir_flag", "metrics_file", "report", "env"}


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    values: dict            # this job's grid values
    flags: dict             # fixed flags, then the grid values

    def directory(self, workdir: Path | str) -> str:
        return f"{str(workdir).rstrip('/')}/{JOBS_DIR}/{self.name}"


def load_grid(path: str | os.PathLike) -> dict:
    text = Path(path).read_text()
    try:
        import yaml
        grid = yaml.safe_load(text)
    except ImportError:   # JSON grids work without PyYAML
        grid = json.loads(text)
    return validate_grid(grid, str(path))


def validate_grid(grid: Any, where: str = "grid") -> dict:
    if not isinstance(grid, dict):
        raise ValueError(f"{where}: expected a mapping with `script`, `flags`, `grid`")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(GRID_KEYS)})")
    if not isinstance(grid.get("script"), str):
        raise ValueError(f"{where}: `script` (the experiment to run) is required")
    grid = {"flags": {}, "grid": {}, "workdir_flag": "workdir", "metrics_file": "metrics.jsonl", "report": None,
            "env": {}, **grid}
    grid["flags"] = grid["flags"] or {}
    subgrids = grid["grid"] if isinstance(grid["grid"], list) else [grid["grid"] or {}]
    for sub in subgrids:
        if not isinstance(sub, dict) or not all(isinstance(v, list) and v for v in sub.values()):
            raise ValueError(f"{where}: `grid` maps each flag to a non-empty list (or is a list of such mappings)")
    grid["grid"] = subgrids
    clash = set(grid["flags"]) & {k for sub in subgrids for k in sub}
    if clash:
        raise ValueError(f"{where}: {sorted(clash)} both fixed (`flags`) and crossed (`grid`)")
    if grid["workdir_flag"] in grid["flags"] or any(grid["workdir_flag"] in sub for sub in subgrids):
        raise ValueError(f"{where}: `{grid['workdir_flag']}` is set by the sweep (each job's directory)")
    return grid


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):   # absl DEFINE_list
        return ",".join(_value_text(v) for v in value)
    return str(value)


def job_name(values: dict) -> str:
    if not values:
        return "default"
    name = ",".join(f"{k}={_value_text(v)}" for k, v in sorted(values.items()))
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
    if len(name) > 120:   # long grids: a readable prefix and a digest of the whole
        import hashlib
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def expand(grid: dict) -> list[Job]:
    """One job per combination of each sub-grid's lists (in the grid's order, the last key fastest);
    combinations repeated by several sub-grids run once."""
    jobs, seen = [], set()
    for sub in grid["grid"]:
        keys = list(sub)
        for combo in itertools.product(*(sub[k] for k in keys)):
            values = dict(zip(keys, combo))
            name = job_name(values)
            if name in seen:
                continue
            seen.add(name)
            jobs.append(Job(name, values, {**grid["flags"], **values}))
    return jobs


def flag_args(flags: dict) -> list[str]:
    """absl-style `--name=value` (booleans true/false, lists comma-joined, None left out)."""
    return [f"--{k}={_value_text(v)}" for k, v in flags.items() if v is not None]


def job_command(grid: dict, job: Job, workdir: Path | str, python: str = sys.executable) -> list[str]:
    return [python, grid["script"], *flag_args(job.flags), f"--{grid['workdir_flag']}={job.directory(workdir)}"]


# ------------------------------------------------------------------------------------------ local runs

def final_metrics(grid: dict, job_dir: Path) -> Optional[dict]:
    """The last record of the job's metrics file (a .json file: the whole object), None if there is none."""
    path = job_dir / grid["metrics_file"]
    if not path.is_file():
        return None
    if path.suffix == ".json":
        return json.loads(path.read_text())
    records = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(records[-1]) if records else None


def is_done(job_dir: Path) -> bool:
    return (job_dir / FINAL_METRICS).is_file()


class Runner:
    """Runs jobs as subprocesses, `parallel` at a time; stops them all if the sweep is killed."""

    def __init__(self, grid: dict, workdir: Path, parallel: int, python: str = sys.executable,
                 echo: bool = True):
        self.grid, self.workdir, self.parallel, self.python, self.echo = grid, workdir, parallel, python, echo
        self.running: dict[str, tuple[subprocess.Popen, Job, float, Any]] = {}
        self.outcomes: dict[str, dict] = {}

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def start(self, job: Job) -> None:
        job_dir = Path(job.directory(self.workdir))
        job_dir.mkdir(parents=True, exist_ok=True)
        command = job_command(self.grid, job, self.workdir, self.python)
        attempts = 1
        if (job_dir / JOB_FILE).is_file():
            attempts = json.loads((job_dir / JOB_FILE).read_text()).get("attempts", 0) + 1
        (job_dir / JOB_FILE).write_text(json.dumps({"name": job.name, "values": job.values, "flags": job.flags,
                                                    "command": command, "attempts": attempts}, indent=2))
        log = open(job_dir / LOG_FILE, "a")
        log.write(f"\n=== attempt {attempts}: {shlex.join(command)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in self.grid["env"].items()}}
        # its own session: stopping the sweep stops the job and anything it started
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running[job.name] = (process, job, time.perf_counter(), log)
        self.say(f"[sweep] start {job.name}" + (f" (attempt {attempts}, resuming)" if attempts > 1 else ""))

    def reap(self) -> None:
        for name, (process, job, began, log) in list(self.running.items()):
            rc = process.poll()
            if rc is None:
                continue
            log.close()
            del self.running[name]
            job_dir = Path(job.directory(self.workdir))
            seconds = round(time.perf_counter() - began, 2)
            metrics = final_metrics(self.grid, job_dir) if rc == 0 else None
            if rc == 0 and metrics is not None:
                (job_dir / FINAL_METRICS).write_text(json.dumps(metrics, indent=2))
                self.outcomes[name] = {"status": "done", "returncode": 0, "seconds": seconds}
                self.say(f"[sweep] done  {name} ({seconds} s)")
            else:
                why = f"exit {rc}" if rc != 0 else f"no metrics in {self.grid['metrics_file']}"
                self.outcomes[name] = {"status": "failed", "returncode": rc, "seconds": seconds}
                self.say(f"[sweep] FAILED {name}: {why}; see {job_dir / LOG_FILE}")

    def stop_all(self) -> None:
        for process, *_ in self.running.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)   # the job's own session (started above)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for process, *_ in self.running.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for _, _, _, log in self.running.values():
            log.close()
        self.running.clear()

    def run(self, jobs: Sequence[Job]) -> dict[str, dict]:
        pending = list(jobs)
        try:
            while pending or self.running:
                while pending and len(self.running) < self.parallel:
                    self.start(pending.pop(0))
                time.sleep(0.05)
                self.reap()
        finally:
            if self.running:
                self.say(f"[sweep] stopping {len(self.running)} running job(s); a restart resumes them")
                self.stop_all()
        return self.outcomes


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -------------------------------------------------------------------------------------------- results

def collect(grid: dict, jobs: Sequence[Job], workdir: Path, outcomes: Optional[dict] = None) -> list[dict]:
    rows = []
    for job in jobs:
        job_dir = Path(job.directory(workdir))
        row = {"name": job.name, "values": job.values, "status": "pending", "metrics": None}
        if is_done(job_dir):
            row["status"], row["metrics"] = "done", json.loads((job_dir / FINAL_METRICS).read_text())
        elif outcomes and job.name in outcomes:
            row["status"] = outcomes[job.name]["status"]
        elif (job_dir / JOB_FILE).is_file():
            row["status"] = "unfinished"
        if outcomes and job.name in outcomes:
            row["seconds"] = outcomes[job.name]["seconds"]
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return _value_text(value)


def results_table(grid: dict, rows: Sequence[dict]) -> str:
    keys = list(dict.fromkeys(k for sub in grid["grid"] for k in sub))
    metrics = grid["report"] or list(dict.fromkeys(k for r in rows for k in (r["metrics"] or {})))
    head = ["job", *keys, "status", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m = row["metrics"] or {}
        cells = [row["name"], *(_cell(row["values"].get(k)) for k in keys), row["status"],
                 *(_cell(m.get(k)) for k in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(grid: dict, rows: Sequence[dict], workdir: Path) -> str:
    table = results_table(grid, rows)
    done = sum(r["status"] == "done" for r in rows)
    text = (f"# Sweep `{grid['script']}`: {done}/{len(rows)} jobs done\n\n"
            f"Fixed flags: `{' '.join(flag_args(grid['flags'])) or '(none)'}`\n\n{table}\n")
    (workdir / "results.md").write_text(text)
    (workdir / "results.json").write_text(json.dumps({"script": grid["script"], "flags": grid["flags"],
                                                      "jobs": list(rows)}, indent=2))
    return text


# ---------------------------------------------------------------------------------------- launch text

def launch_commands(grid: dict, jobs: Sequence[Job], workdir: str, kind: str, *, nodes: int, port: int = 8476,
                    gpus_per_node: int = 8, repo_dir: str = "~/twotower-jax", python: str = "python",
                    tpu_name: str = "TPU_NAME", zone: str = "ZONE", project: Optional[str] = None,
                    time_limit: str = "24:00:00") -> str:
    """The shell text that launches each job on `nodes` hosts, one JAX process per host:
    `slurm`: an `sbatch` script per job body run through `srun` (the coordinator is the first node of the
    allocation, process id = SLURM_PROCID); `tpu`: `gcloud compute tpus tpu-vm ssh --worker=all` (the
    coordinator is worker 0's internal IP, process id = the worker number from the VM's metadata)."""
    if kind not in ("slurm", "tpu"):
        raise ValueError(f"launch kind {kind!r}: slurm or tpu")
    out = ["#!/usr/bin/env bash", f"# {len(jobs)} job(s) of {grid['script']} on {nodes} host(s) each "
           f"(generated by experiments/sweep.py --print-launch {kind})"]
    if kind == "slurm":   # jobs queue side by side; Slurm writes each job's output file into the sweep directory
        out += ["set -euo pipefail", f"mkdir -p {shlex.quote(str(workdir).rstrip('/') + '/' + JOBS_DIR)}", ""]
    else:                 # the slice runs one job after another; a failed job does not stop the next
        out += ["set -uo pipefail", ""]
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in grid["env"].items())
    env = env + " " if env else ""
    if kind == "tpu":
        where = f"--zone={zone}" + (f" --project={project}" if project else "")
        out += ["# worker 0's internal IP; each worker reads its own number from the VM metadata (escaped: remote)",
                f"COORDINATOR=$(gcloud compute tpus tpu-vm describe {tpu_name} {where} "
                "--format='value(networkEndpoints[0].ipAddress)')", ""]
        worker_id = ("\\$(curl -s -H Metadata-Flavor:Google "
                     "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)")
    for job in jobs:
        base = shlex.join(job_command(grid, job, workdir, python))
        if kind == "slurm":
            # single-quoted for `bash -c`: SLURM_PROCID and friends expand inside each task
            inner = (f"cd {repo_dir} && {env}{base} --coordinator_address=$COORDINATOR:{port} "
                     f"--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID")
            out += [f"# {job.name}",
                    f"sbatch --job-name={shlex.quote('sweep-' + job.name)} --nodes={nodes} --ntasks-per-node=1 "
                    f"--gpus-per-node={gpus_per_node} --time={time_limit} "
                    f"--output={shlex.quote(job.directory(workdir) + '.slurm-%j.out')} <<'EOF'",
                    "#!/bin/bash",
                    "export COORDINATOR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)",
                    f"srun --ntasks-per-node=1 bash -c {shlex.quote(inner)}",
                    "EOF", ""]
        else:
            remote = (f"cd {repo_dir} && {env}{base} --coordinator_address=$COORDINATOR:{port} "
                      f"--num_processes={nodes} --process_id={worker_id}")
            out += [f"# {job.name}",
                    f"gcloud compute tpus tpu-vm ssh {tpu_name} {where} --worker=all --command=\"{remote}\"", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="grid YAML (or JSON)")
    p.add_argument("--workdir", required=True, help="sweep directory (jobs/, results.md, results.json)")
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time (local runs)")
    p.add_argument("--python", default=sys.executable, help="interpreter for local jobs")
    p.add_argument("--collect-only", action="store_true", help="run nothing: write the table of what is done")
    p.add_argument("--dry-run", action="store_true", help="print each job's local command and state")
    launch = p.add_argument_group("multi-host launch text (nothing is run)")
    launch.add_argument("--print-launch", choices=("slurm", "tpu"))
    launch.add_argument("--nodes", type=int, default=2, help="hosts (JAX processes) per job")
    launch.add_argument("--port", type=int, default=8476, help="coordinator port")
    launch.add_argument("--gpus-per-node", type=int, default=8)
    launch.add_argument("--time", default="24:00:00", help="Slurm time limit")
    launch.add_argument("--repo-dir", default="~/twotower-jax", help="the repository on each host")
    launch.add_argument("--remote-python", default="python")
    launch.add_argument("--tpu-name", default="TPU_NAME")
    launch.add_argument("--zone", default="ZONE")
    launch.add_argument("--project", default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = expand(grid)
    if args.print_launch:
        text = launch_commands(grid, jobs, args.workdir, args.print_launch, nodes=args.nodes, port=args.port,
                               gpus_per_node=args.gpus_per_node, repo_dir=args.repo_dir, python=args.remote_python,
                               tpu_name=args.tpu_name, zone=args.zone, project=args.project, time_limit=args.time)
        if "://" not in args.workdir:   # a local (or shared-filesystem) sweep directory: keep the script there
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            (Path(args.workdir) / f"launch_{args.print_launch}.sh").write_text(text + "\n")
        print(text)
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not is_done(Path(job.directory(workdir)))]
    if args.dry_run:
        for job in jobs:
            state = "done" if job not in todo else "to run"
            print(f"{state:7s} {shlex.join(job_command(grid, job, workdir, args.python))}")
        return 0
    outcomes = {}
    if not args.collect_only:
        print(f"[sweep] {len(jobs)} job(s): {len(jobs) - len(todo)} done, {len(todo)} to run, "
              f"{args.parallel} at a time", flush=True)
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        runner = Runner(grid, workdir, max(args.parallel, 1), args.python)
        try:
            outcomes = runner.run(todo)
        except KeyboardInterrupt:
            write_results(grid, collect(grid, jobs, workdir, runner.outcomes), workdir)
            print("[sweep] interrupted; run the same command again to finish the unfinished jobs", flush=True)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
    rows = collect(grid, jobs, workdir, outcomes)
    print(write_results(grid, rows, workdir))
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
