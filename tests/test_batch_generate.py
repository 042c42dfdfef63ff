"""batch_generate: crash safety under SIGKILL, resume, bad rows, batch independence, 2 processes == 1."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twotower_jax import batch_generate
from twotower_jax.batch_generate import FAULT_ENV, recover

N_GOOD = 200
ARGS = ["--checkpoint", "demo", "--mode", "ar", "--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "20",
        "--seed", "5", "--max-prompt-len", "40", "--progress", "off"]
ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path) -> None:
    rng = random.Random(0)
    lines = []
    for i in range(N_GOOD):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
        task = rng.choice(["copy", "sort"])     # every prompt in the 16-token bucket: few programs to compile
        row = {"id": f"q{i}", "prompt": f"{task} {word}="}
        if i % 7 == 0:
            row["max_new_tokens"] = 5
        if i % 11 == 0:
            row["stop"] = ["a"]
        if i % 13 == 0:
            row["seed"] = 99
        lines.append(json.dumps(row))
    bad = ['{"prompt": "copy a="}',                      # no id
           json.dumps({"id": "q3", "prompt": "copy b="}),  # duplicate id
           json.dumps({"id": "empty", "prompt": ""}),
           json.dumps({"id": "long", "prompt": "x" * 100}),
           json.dumps({"id": "vocab", "prompt_ids": [1, 5000]}),
           '{"id": "broken", "prompt": ',                 # not JSON
           json.dumps({"id": 7, "prompt_ids": [1, 103, 112, 121, 36, 101, 65]})]   # ids; int id
    for k, line in enumerate(bad):
        lines.insert(17 * (k + 1), line)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process)."""
    directory = tmp_path_factory.mktemp("batch")
    make_input(directory / "in.jsonl")
    out = directory / "ref.jsonl"
    assert batch_generate.main(ARGS + ["--input", str(directory / "in.jsonl"), "--output", str(out),
                                       "--batch-size", "32", "--summary", str(directory / "summary.json")]) == 0
    return directory, out.read_bytes()


def cli(directory: Path, output: str, *extra, env=None, wait=True):
    """`python -m twotower_jax.batch_generate` in a subprocess with one CPU device; the subprocesses share a
    persistent compilation cache (so each pays the compiles once)."""
    command = [sys.executable, "-m", "twotower_jax.batch_generate", *ARGS, "--input", str(directory / "in.jsonl"),
               "--output", str(directory / output), *extra]
    environment = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=1"),
        JAX_COMPILATION_CACHE_DIR=str(directory / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **(env or {}))
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if wait:
        out, err = process.communicate(timeout=600)
        return process.returncode, err
    return process


def test_reference_rows(reference):
    directory, data = reference
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert len(rows) == N_GOOD + 7
    errors = {r["line"]: r["error"] for r in rows if "error" in r}
    assert len(errors) == 6
    text = " | ".join(errors.values())
    for message in ("row has no id", "duplicate id 'q3'", "empty prompt", "over the limit max_prompt_len=40",
                    "outside the vocabulary", "not valid JSON"):
        assert message in text
    good = [r for r in rows if "error" not in r]
    assert [r["id"] for r in good[:3]] == ["q0", "q1", "q2"] and 7 in [r["id"] for r in good]
    by_id = {r["id"]: r for r in good}
    assert len(by_id["q7"]["tokens"]) <= 5 and by_id["q1"]["finish_reason"] in ("eos", "length", "stop")
    for r in good:
        assert set(r) == {"id", "completion", "tokens", "finish_reason", "stats"}
        if r["finish_reason"] == "stop":
            assert "a" not in r["completion"]
    assert any(r["finish_reason"] == "stop" for r in good)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["rows"] == N_GOOD + 1 and summary["error_rows"] == 6 and summary["tokens_per_second"] > 0


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(reference):
    directory, expected = reference
    output = directory / "killed.jsonl"
    # 1. killed after the first written batch (the error rows) and one batch of 32
    code, _ = cli(directory, "killed.jsonl", "--batch-size", "32", env={FAULT_ENV: "after_batches=2"})
    assert code == -signal.SIGKILL
    first = recover(output)
    assert 0 < len(first) < N_GOOD
    # 2. killed in the middle of writing a batch: a torn last line
    code, _ = cli(directory, "killed.jsonl", "--batch-size", "32", env={FAULT_ENV: "after_batches=1,partial=1"})
    assert code == -signal.SIGKILL
    assert not output.read_bytes().endswith(b"\n")
    # 3. killed from outside at an arbitrary moment of a run in small batches
    process = cli(directory, "killed.jsonl", "--batch-size", "2", wait=False)
    start = len(recover(output))
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= start + 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL     # killed mid-run, not finished before the kill
    assert start < len(recover(output)) < N_GOOD
    # 4. restart to the end
    code, err = cli(directory, "killed.jsonl", "--batch-size", "32")
    assert code == 0, err
    assert "already done" in err
    assert output.read_bytes() == expected


def test_two_processes_with_another_batch_size_give_the_same_bytes(reference):
    """2 processes (jax.distributed, one CPU device each), batches of 8 instead of 32: the merged file is the
    1-process file byte for byte (each request's output depends on its seed and id only)."""
    directory, expected = reference
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [cli(directory, "two.jsonl", "--batch-size", "8", "--coordinator-address", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(k), wait=False) for k in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    parts = [directory / f"two.jsonl.part-{k}-of-2" for k in range(2)]
    assert all(len(recover(p)) > N_GOOD // 3 for p in parts)
    assert (directory / "two.jsonl").read_bytes() == expected


def test_recover_truncates_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":1}\n{"id":2}\n{"id":')
    assert recover(path) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == b'{"id":1}\n{"id":2}\n'
    path.write_bytes(b'garbage\n')
    with pytest.raises(ValueError, match="not a JSON row"):
        recover(path)


def test_restart_with_other_settings_is_refused(reference, capsys):
    directory, _ = reference
    with pytest.raises(SystemExit) as info:
        batch_generate.main(ARGS[:-6] + ["--seed", "6", "--max-prompt-len", "40", "--progress", "off", "--input",
                                         str(directory / "in.jsonl"), "--output", str(directory / "ref.jsonl")])
    assert info.value.code == 2
    assert "other settings (seed" in capsys.readouterr().err
