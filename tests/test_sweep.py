"""experiments/sweep.py with a tiny fake experiment script: grid expansion, jobs run K at a time, a restart
runs only the unfinished jobs (after failures and after killing the sweep), the collected table + JSON,
and the multi-host launch text for Slurm and a TPU slice, executed against stub srun/sbatch/gcloud."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402

# A stand-in for train_*.py: absl-style --flag=value, resumes from the steps already in metrics.jsonl,
# logs its start time and argv; FAKE_FAIL=<name substring> makes matching jobs exit 1 half-way;
# FAKE_HANG=<substring> makes them sleep half-way (to be killed).
FAKE = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    work = Path(flags["workdir"]); work.mkdir(parents=True, exist_ok=True)
    with open(work / "argv.jsonl", "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "start": time.time(), "pid": os.getpid()}) + "\\n")
    metrics = work / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    steps, lr, bs = int(flags["steps"]), float(flags["lr"]), int(flags["block_size"])
    for step in range(done + 1, steps + 1):
        if step == steps // 2 + 1:
            if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in work.name:
                sys.exit(1)
            if os.environ.get("FAKE_HANG") and os.environ["FAKE_HANG"] in work.name:
                time.sleep(300)
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step, "loss": lr * bs / step, "resumed_from": done}) + "\\n")
''')


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    grid = {"script": str(script), "flags": {"steps": 6, "tag": "x y"},
            "grid": {"lr": [0.1, 0.2], "block_size": [8, 16]}, "report": ["step", "loss", "resumed_from"]}
    path = tmp_path / "grid.yaml"
    import yaml
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return tmp_path, path, grid


def run_sweep(args, env=None, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "sweep.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120, **kwargs)


def test_expansion_and_flags(setup, tmp_path):
    _, path, _ = setup
    grid = sweep.load_grid(path)
    jobs = sweep.expand(grid)
    assert [j.name for j in jobs] == ["block_size=8,lr=0.1", "block_size=16,lr=0.1",
                                      "block_size=8,lr=0.2", "block_size=16,lr=0.2"]
    assert jobs[1].flags == {"steps": 6, "tag": "x y", "lr": 0.1, "block_size": 16}
    command = sweep.job_command(grid, jobs[1], "W", python="py")
    assert command[2:] == ["--steps=6", "--tag=x y", "--lr=0.1", "--block_size=16", "--workdir=W/jobs/block_size=16,lr=0.1"]
    assert sweep.flag_args({"on": True, "off": False, "sizes": [32, 16], "none": None}) == [
        "--on=true", "--off=false", "--sizes=32,16"]
    # a list of sub-grids: their union, duplicates once; JSON grids are read too
    union = sweep.validate_grid({"script": "s.py", "grid": [{"a": [1, 2]}, {"a": [2, 3], "b": [True]}, {"a": [1]}]})
    assert [j.name for j in sweep.expand(union)] == ["a=1", "a=2", "a=2,b=true", "a=3,b=true"]
    (tmp_path / "g.json").write_text(json.dumps({"script": "s.py", "grid": {"x": [1]}}))
    assert sweep.expand(sweep.load_grid(tmp_path / "g.json"))[0].flags == {"x": 1}
    for bad, why in [({"grid": {}}, "script"), ({"script": "s", "grid": {"a": 1}}, "non-empty list"),
                     ({"script": "s", "flags": {"a": 1}, "grid": {"a": [2]}}, "both fixed"),
                     ({"script": "s", "flags": {"workdir": "x"}}, "set by the sweep"),
                     ({"script": "s", "gird": {}}, "unknown keys")]:
        with pytest.raises(ValueError, match=why):
            sweep.validate_grid(bad)


def _starts(work):
    return {p.parent.name: [json.loads(l) for l in p.read_text().splitlines()]
            for p in (work / "jobs").glob("*/argv.jsonl")}


def test_parallel_run_restart_and_collection(setup):
    tmp, path, _ = setup
    work = tmp / "sweep"
    # first pass: the lr=0.2 jobs fail half-way (as an interrupted run would leave them)
    first = run_sweep(["--grid", str(path), "--workdir", str(work), "--parallel", "2"],
                      env={"FAKE_FAIL": "lr=0.2", "FAKE_STEP_SECONDS": "0.5"})
    assert first.returncode == 1, first.stdout + first.stderr
    assert "FAILED block_size=8,lr=0.2" in first.stdout
    starts = _starts(work)
    assert len(starts) == 4 and all(len(v) == 1 for v in starts.values())
    # two at a time: the first pair ran together (each takes >= 6 x 0.5 s), the second pair only after it
    t = sorted(v[0]["start"] for v in starts.values())
    assert t[1] - t[0] < 2.5 and t[2] - t[0] >= 3.0
    results = json.loads((work / "results.json").read_text())
    assert [r["status"] for r in results["jobs"]] == ["done", "done", "failed", "failed"]
    assert "| block_size=8,lr=0.1 | 0.1 | 8 | done | 6 | 0.1333 | 0 |" in (work / "results.md").read_text()
    # restart: only the failed jobs run again, resuming from their partial metrics
    second = run_sweep(["--grid", str(path), "--workdir", str(work), "--parallel", "2"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 job(s): 2 done, 2 to run" in second.stdout
    starts = _starts(work)
    assert {k: len(v) for k, v in starts.items()} == {"block_size=8,lr=0.1": 1, "block_size=16,lr=0.1": 1,
                                                     "block_size=8,lr=0.2": 2, "block_size=16,lr=0.2": 2}
    results = json.loads((work / "results.json").read_text())
    assert all(r["status"] == "done" and r["metrics"]["step"] == 6 for r in results["jobs"])
    resumed = {r["name"]: r["metrics"]["resumed_from"] for r in results["jobs"]}
    assert resumed == {"block_size=8,lr=0.1": 0, "block_size=16,lr=0.1": 0,
                       "block_size=8,lr=0.2": 3, "block_size=16,lr=0.2": 3}
    assert results["jobs"][3]["metrics"]["loss"] == pytest.approx(0.2 * 16 / 6)
    # a third pass has nothing to do; --collect-only rewrites the table
    third = run_sweep(["--grid", str(path), "--workdir", str(work), "--collect-only"])
    assert third.returncode == 0 and "4/4 jobs done" in third.stdout


def test_killing_the_sweep_stops_its_jobs_and_a_restart_finishes_them(setup):
    tmp, path, _ = setup
    work = tmp / "sweep"
    process = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "sweep.py"), "--grid", str(path),
                                "--workdir", str(work), "--parallel", "4"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "FAKE_HANG": "block_size=16"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:   # the two block_size=8 jobs finish; the others hang half-way
            done = [p for p in (work / "jobs").glob("*/final_metrics.json")]
            hanging = [p for p in (work / "jobs").glob("block_size=16*/metrics.jsonl")
                       if len(p.read_text().splitlines()) == 3]
            if len(done) == 2 and len(hanging) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the sweep did not reach the expected state")
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "interrupted" in out
    for runs in _starts(work).values():   # the hanging jobs were stopped with the sweep
        for run in runs:
            with pytest.raises(ProcessLookupError):
                os.kill(run["pid"], 0)
    again = run_sweep(["--grid", str(path), "--workdir", str(work), "--parallel", "4"])
    assert again.returncode == 0 and "2 done, 2 to run" in again.stdout
    assert {k: len(v) for k, v in _starts(work).items()} == {"block_size=8,lr=0.1": 1, "block_size=8,lr=0.2": 1,
                                                           "block_size=16,lr=0.1": 2, "block_size=16,lr=0.2": 2}


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_launch_text_runs_each_job_on_every_host(setup):
    """The generated scripts executed with stub cluster tools: each job starts once per host with the
    jax.distributed flags (coordinator = first host, process ids 0..n-1)."""
    tmp, path, _ = setup
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'bash -s\n')                                  # runs the batch script from stdin
    _stub(bin_dir, "scontrol", 'printf "gpu-node-7\\ngpu-node-8\\n"\n')
    _stub(bin_dir, "srun", 'while [[ $1 == -* ]]; do shift; done\n'                  # its options, then the command
          'for i in 0 1; do SLURM_PROCID=$i SLURM_NTASKS=2 "$@"; done\n')
    _stub(bin_dir, "gcloud", 'if [ "$4" = describe ]; then echo 10.1.2.3; exit; fi\n'
          'for a in "$@"; do case $a in --command=*) cmd=${a#--command=};; esac; done\n'
          'for i in 0 1; do FAKE_WORKER=$i bash -c "$cmd"; done\n')
    _stub(bin_dir, "curl", 'echo $FAKE_WORKER\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for kind, coordinator in (("slurm", "gpu-node-7:8476"), ("tpu", "10.1.2.3:8476")):
        work = tmp / f"launch-{kind}"
        out = run_sweep(["--grid", str(path), "--workdir", str(work), "--print-launch", kind, "--nodes", "2",
                         "--repo-dir", str(ROOT), "--remote-python", sys.executable, "--tpu-name", "pod",
                         "--zone", "us-central2-b"])
        assert out.returncode == 0, out.stderr
        script = work / f"launch_{kind}.sh"
        assert script.read_text().strip() == out.stdout.strip()
        assert ("sbatch --job-name=sweep-block_size=8,lr=0.1 --nodes=2" in out.stdout if kind == "slurm" else
                "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all" in out.stdout)
        ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert ran.returncode == 0, ran.stderr
        starts = _starts(work)
        assert len(starts) == 4
        for name, runs in starts.items():
            assert len(runs) == 2
            for process_id, run in enumerate(runs):
                assert run["argv"][-3:] == [f"--coordinator_address={coordinator}", "--num_processes=2",
                                            f"--process_id={process_id}"]
                assert f"--workdir={work}/jobs/{name}" in run["argv"] and "--tag=x y" in run["argv"]
