"""Resumable, multi-process generation for a JSONL file of prompts.

    python -m twotower_jax.batch_generate --checkpoint DIR --input in.jsonl --output out.jsonl \\
        [--mode ar|mock_ar|diffusion|self_speculative] [--batch-size N] [--seed S] [--max-new-tokens N] ...

Input rows: `{"id": ..., "prompt": TEXT | "prompt_ids": [ints], "max_new_tokens"?: int, "seed"?: int,
"stop"?: [strings]}`. Output rows, one per input row:
`{"id", "completion", "tokens", "finish_reason", "stats"}` (`completion` is None without a tokenizer;
`finish_reason` "eos" | "stop" | "length"; `stats` per row: prompt tokens, new tokens, the passes the row
took part in), or for a row that cannot run `{"id", "line", "error", "finish_reason": "error"}` (bad JSON,
missing / duplicate id, empty or over-long prompt, bad settings) — a bad row never stops the job.

Crash safety. Rows are appended to the output (a part file per process) as each compiled batch finishes,
then flushed and fsync'ed. A restart with the same arguments truncates a torn last line, skips every row
already there, and generates the rest; each request's output depends only on (seed, id, its own settings)
(`twotower_jax.engine`), so the rows are byte-identical to an uninterrupted run's. When every row is done
the output is rewritten in input order (temporary file + rename), so after `kill -9` at any point and a
restart the final file equals an uninterrupted run's byte for byte. The generation settings are kept next
to the output (`OUT.meta.json`); a restart with other settings is refused.

More than one process. With `--num-processes P --process-id K --coordinator-address HOST:PORT` (or
`--distributed` to let `jax.distributed.initialize()` read a cluster's environment) process K takes the
input rows whose line index ≡ K (mod P), runs them on its local devices, and writes `OUT.part-K-of-P`; each
part is resumable on its own. Process 0 waits for every part's `.done` marker and merges them into `OUT`
in input order — the same file a single process writes.

Prints progress on a terminal and a final throughput summary (rows/s, tokens/s, tokens per pass).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from twotower_jax.engine import MODES, Engine, GenerationConfig, Request, RequestError, throughput_summary
from twotower_jax.progress import Progress

FAULT_ENV = "TWOTOWER_BATCH_GENERATE_FAULT"   # testing: "after_batches=K[,partial=1]" SIGKILLs this process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower_jax.batch_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF-layout directory, orbax checkpoint, or `demo`")
    p.add_argument("--input", required=True, type=Path, help="JSONL, one request per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL results (appended; a restart resumes)")
    p.add_argument("--mode", choices=MODES, default="ar")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="request r samples from fold_in(key(seed), id) unless "
                                                       "its row sets its own seed")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default for rows without their own")
    p.add_argument("--max-prompt-len", type=int, default=4096, help="longer prompts get an error row")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos-token-id", type=int, default=None, help="default: the checkpoint's; -1: never stop")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps-per-block", type=int, default=16)
    p.add_argument("--confidence-threshold", type=float, default=0.9)
    p.add_argument("--mask-token-id", type=int, default=3)
    p.add_argument("--draft-steps", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--placement", choices=["single", "towers", "sharded"], default="single")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices")
    p.add_argument("--coordinator-address", default=None, help="jax.distributed coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with the cluster's environment (SLURM, TPU pods, ...)")
    p.add_argument("--merge-timeout", type=float, default=86400.0,
                   help="seconds process 0 waits for the other parts before giving up (they stay resumable)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--summary", type=Path, default=None, help="also write the throughput summary here (JSON)")
    return p


# --- input ----------------------------------------------------------------------------------------------

def read_input(path: Path) -> list[tuple[int, object]]:
    """[(line index, parsed JSON or the error text)] for every non-blank line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append((index, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((index, f"line {index + 1}: not valid JSON ({e.msg})"))
    return rows


def to_request(obj) -> Request:
    """An input row as a Request (RequestError for what is wrong with it)."""
    if not isinstance(obj, dict):
        raise RequestError("a row must be a JSON object")
    if "id" not in obj or obj["id"] is None:
        raise RequestError("row has no id")
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise RequestError(f"id must be a string or an integer, got {rid!r}")
    unknown = set(obj) - {"id", "prompt", "prompt_ids", "max_new_tokens", "seed", "stop"}
    if unknown:
        raise RequestError(f"request {rid!r}: unknown fields {sorted(unknown)}")
    stop = obj.get("stop") or ()
    if isinstance(stop, str):
        stop = [stop]
    return Request(id=rid, prompt=obj.get("prompt"), prompt_ids=obj.get("prompt_ids"),
                   max_new_tokens=obj.get("max_new_tokens"), seed=obj.get("seed"),
                   stop=tuple(stop) if isinstance(stop, list) else stop)


def id_key(rid) -> str:
    """How ids are compared: 7 and "7" are different ids."""
    return json.dumps(rid)


# --- output ---------------------------------------------------------------------------------------------

def dump(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def completion_row(completion, prompt_tokens: int) -> dict:
    return {"id": completion.id, "completion": completion.text, "tokens": completion.tokens,
            "finish_reason": completion.finish_reason, "stats": dict(completion.stats, prompt_tokens=prompt_tokens)}


def error_row(rid, line: int, message: str) -> dict:
    return {"id": rid, "line": line + 1, "error": message, "finish_reason": "error"}


def recover(path: Path) -> list[dict]:
    """The rows of an output file written by an earlier (possibly killed) run; a torn last line (no
    newline: the write was cut) is truncated away, on disk too."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number + 1} is not a JSON row; this does not look like an output of this "
                             f"job (move it away to start over)") from None
    return rows


def row_done_key(row: dict):
    return ("error", row["line"]) if "error" in row else ("id", id_key(row["id"]))


class Appender:
    """Appends rows to a file: one write per batch, flushed and fsync'ed before the next batch runs."""
    def __init__(self, path: Path):
        self.f = open(path, "ab")
        self.batches = 0
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = dict(item.split("=") for item in fault.split(",") if item)

    def write(self, rows: Sequence[dict]) -> None:
        data = "".join(dump(r) for r in rows).encode("utf-8")
        self.batches += 1
        if self.fault and self.batches > int(self.fault.get("after_batches", 0)):
            if self.fault.get("partial"):   # a torn write: part of the batch, then the kill
                self.f.write(data[:max(len(data) // 2, 1)])
                self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.f.write(data)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def write_atomically(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write("".join(dump(r) for r in rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def in_input_order(rows: Sequence[dict], order: dict) -> list[dict]:
    """Rows sorted by their input line (`order`: id key -> line index)."""
    def line(row):
        return row["line"] - 1 if "error" in row else order[id_key(row["id"])]
    return sorted(rows, key=line)


# --- the job --------------------------------------------------------------------------------------------

def generation_config(args) -> GenerationConfig:
    return GenerationConfig(
        mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eos_token_id=args.eos_token_id, block_size=args.block_size,
        steps_per_block=args.steps_per_block, confidence_threshold=args.confidence_threshold,
        mask_token_id=args.mask_token_id, draft_steps=args.draft_steps)


def settings(args) -> dict:
    """What the output depends on: a restart must use the same."""
    keys = ("checkpoint", "mode", "seed", "max_new_tokens", "max_prompt_len", "temperature", "top_k", "top_p",
            "eos_token_id", "block_size", "steps_per_block", "confidence_threshold", "mask_token_id",
            "draft_steps", "dtype")
    return {k: getattr(args, k) for k in keys} | {"input": str(args.input.resolve())}


def check_settings(output: Path, args) -> None:
    meta = output.with_name(output.name + ".meta.json")
    want = settings(args)
    if meta.exists():
        have = json.loads(meta.read_text())
        if have != want:
            changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{output} was started with other settings ({', '.join(changed)}: {meta}); "
                             f"resume with the same arguments, or move the output away to start over")
    else:
        meta.write_text(json.dumps(want, indent=1) + "\n")


def init_distributed(args) -> tuple[int, int]:
    """(process index, process count), after jax.distributed.initialize when asked for."""
    import jax

    from twotower_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           from_environment=args.distributed)
    return jax.process_index(), jax.process_count()


def part_path(output: Path, index: int, count: int) -> Path:
    return output if count == 1 else output.with_name(f"{output.name}.part-{index}-of-{count}")


def run(args) -> dict:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    config = generation_config(args)
    process, processes = init_distributed(args)
    rows = read_input(args.input)
    if args.output.exists() or process == 0:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    if process == 0:
        check_settings(args.output, args)
    mine = part_path(args.output, process, processes)
    done_marker = mine.with_name(mine.name + ".done")

    # Which rows are valid (duplicates: the first occurrence runs; ids never depend on the shard).
    first_line: dict = {}
    order: dict = {}
    plan = []   # (line, Request | None, error)
    for line, obj in rows:
        if isinstance(obj, str):
            plan.append((line, None, None, obj))
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        try:
            request = to_request(obj)
        except RequestError as e:
            plan.append((line, None, rid, str(e)))
            continue
        key = id_key(request.id)
        if key in first_line:
            plan.append((line, None, request.id, f"duplicate id {request.id!r} (first on line {first_line[key] + 1})"))
            continue
        first_line[key] = order[key] = line
        plan.append((line, request, request.id, None))

    shard = [item for i, item in enumerate(plan) if i % processes == process]
    existing = recover(mine)
    done = {row_done_key(r) for r in existing}
    import jax
    devices = jax.local_devices()
    if args.devices is not None:
        devices = devices[:args.devices]
    engine = Engine.load(args.checkpoint, dtype=args.dtype, placement=args.placement, devices=devices,
                         batch_size=args.batch_size, max_prompt_len=args.max_prompt_len)
    out = Appender(mine)
    errors, todo = [], []
    for line, request, rid, message in shard:
        if request is None:
            if ("error", line + 1) not in done:
                errors.append(error_row(rid, line, message))
            continue
        if ("id", id_key(request.id)) in done or ("error", line + 1) in done:
            continue
        try:   # checked one by one here, so a bad row becomes an error row, not a failed batch
            engine.prompt_ids(request)
            engine._settings(request, config)
        except RequestError as e:
            errors.append(error_row(request.id, line, str(e)))
            continue
        todo.append(request)
    if errors:
        out.write(errors)
    total = sum(1 for item in shard)
    progress = Progress(total, {"auto": None, "on": True, "off": False}[args.progress], "rows",
                        start=total - len(todo))
    prompt_len = {id_key(r.id): len(engine.prompt_ids(r)) for r in todo}
    begin = time.perf_counter()

    def on_batch(completions):
        out.write([completion_row(c, prompt_len[id_key(c.id)]) for c in completions])
        progress.update(progress.done + len(completions))

    if todo:
        engine.generate(todo, config, on_batch=on_batch)
    out.close()
    wall = time.perf_counter() - begin
    summary = throughput_summary(engine.totals, wall) | {"process": process, "processes": processes,
                                                          "skipped_rows": total - len(todo) - len(errors),
                                                          "error_rows": len(errors), "mode": args.mode,
                                                          "batch_size": args.batch_size}
    if processes == 1:
        write_atomically(mine, in_input_order(recover(mine), order))
    else:
        done_marker.write_text(json.dumps(summary) + "\n")
        if process == 0:
            merge_parts(args.output, processes, order, args.merge_timeout)
    return summary


def merge_parts(output: Path, processes: int, order: dict, timeout: float) -> None:
    """Waits for every part's `.done` marker, then writes `output` in input order (atomically)."""
    deadline = time.monotonic() + timeout
    parts = [part_path(output, k, processes) for k in range(processes)]
    while True:
        missing = [p for p in parts if not p.with_name(p.name + ".done").exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"parts not finished after {timeout:.0f} s: {[str(p) for p in missing]} (rerun "
                               f"those processes; their parts resume)")
        time.sleep(0.2)
    rows = [row for p in parts for row in recover(p)]
    write_atomically(output, in_input_order(rows, order))


def format_summary(s: dict) -> str:
    return (f"{s['rows']} rows generated ({s['skipped_rows']} already done, {s['error_rows']} errors) in "
            f"{s['wall_seconds']:.2f} s: {s['rows_per_second']:.2f} rows/s, {s['tokens_per_second']:.1f} tokens/s, "
            f"{s['tokens_per_pass']:.2f} tokens per pass; excluding {s['compile_seconds']:.1f} s of compiles: "
            f"{s['rows_per_generation_second']:.2f} rows/s, {s['tokens_per_generation_second']:.1f} tokens/s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    print(format_summary(summary), file=sys.stderr)
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
