"""Offline lm-evaluation-harness runs of a TwoTower (or single-tower) checkpoint.

    python -m twotower_jax.evaluate --checkpoint DIR --tasks T[,T...] [--include-path DIR] \\
        [--model-args mode=diffusion,confidence_threshold=0.8,block_size=16] [--limit N] --output-path OUT

Runs the `twotower` model (`twotower_jax.lm_eval_model`) through `lm_eval.simple_evaluate` with the
Hugging Face hub switched off (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`): tasks come from lm-eval's own
registry or `--include-path` (task YAMLs whose `dataset_path` / `dataset_kwargs.data_files` point at local
files, or datasets already in the local HF cache). Writes lm-eval's results JSON to OUT (a `.json` file, or
OUT/results.json for a directory) and prints lm-eval's table. Needs the `eval` extra (`pip install
twotower-jax[eval]`). With `--coordinator-address --num-processes --process-id` (or `--distributed`) each
process evaluates its share of every task (lm-eval's rank/world_size) and process 0 writes the results.

The release's benchmarks on a GPU/TPU machine that has the datasets in its Hugging Face cache (or as local
files behind `--include-path` YAMLs) and the converted checkpoint (`python -m convert`, bf16):

    pip install -e '.[eval]'            # plus the machine's jax[cuda]/jax[tpu]
    for MODE in "mode=ar" "mode=diffusion,confidence_threshold=0.8,block_size=16,steps_per_block=16" \
                "mode=self_speculative,block_size=16"; do
      python -m twotower_jax.evaluate --checkpoint ckpt/ \
          --tasks mmlu,mmlu_pro,arc_challenge,winogrande,race,gsm8k,minerva_math500,mgsm_direct,global_mmlu_lite \
          --model-args "$MODE,placement=towers,max_length=4096,max_gen_toks=512" --batch-size 32 \
          --output-path results/$MODE
      HF_ALLOW_CODE_EVAL=1 python -m twotower_jax.evaluate --checkpoint ckpt/ --tasks humaneval,mbpp \
          --model-args "$MODE,placement=towers" --confirm-run-unsafe-code --output-path results/code-$MODE
    done

(task names as in lm-eval 0.4.13: check `lm_eval --tasks list`; the release's few-shot counts and prompts
are its own — set `--num-fewshot` per task to match the paper's table.) `placement=towers` puts each tower
on its own GPU group (2 × H100 for the 30B-A3B release, as its `place_towers_on_devices`); `sharded` splits
both over every device. Multiple-choice tasks (MMLU, ARC, WinoGrande, RACE) are scored by log-likelihood,
which is the context tower's exact AR log-probability in every mode: their numbers differ between modes
only through generation tasks (GSM8K, MATH-500, MGSM, HumanEval, MBPP). Sweep γ / S / T through
`--model-args`. Several hosts: start one process per host with `--coordinator-address HOST0:PORT
--num-processes N --process-id K` (or `--distributed` under SLURM / on TPU pods).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF-layout directory, orbax checkpoint, or `demo`")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    p.add_argument("--model-args", default="", help="k=v,... for the twotower model: mode, block_size, "
                   "steps_per_block, confidence_threshold, draft_steps, temperature, top_k, top_p, max_length, "
                   "max_gen_toks, dtype, placement, devices, seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random/numpy/fewshot seeds")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="let code tasks (humaneval, mbpp) execute the generated code (lm-eval's flag)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document samples in the output")
    p.add_argument("--output-path", required=True, type=Path)
    p.add_argument("--coordinator-address", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the environment")
    return p


def results_path(output: Path) -> Path:
    return output if output.suffix == ".json" else output / "results.json"


def task_manager(task_manager_class, include_path, tasks: Sequence[str]):
    """lm-eval's task index: only `include_path`'s tasks when it defines every requested name (indexing
    lm-eval's ~15,000 built-in task configs takes ~12 s of CPU per process), else those and the built-ins."""
    if include_path:
        local = task_manager_class(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return task_manager_class(include_path=include_path)


def run(args) -> Optional[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("python -m twotower_jax.evaluate needs lm-evaluation-harness: pip install "
                         "'twotower-jax[eval]'") from None
    from twotower_jax import distributed
    from twotower_jax.lm_eval_model import TwoTowerLM
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           from_environment=args.distributed)
    model_args = f"checkpoint={args.checkpoint}" + (f",{args.model_args}" if args.model_args else "")
    lm = TwoTowerLM.create_from_arg_string(model_args, {"batch_size": args.batch_size})
    tasks = [t for t in args.tasks.split(",") if t]
    manager = task_manager(TaskManager, args.include_path, tasks)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=args.log_samples,
                                      random_seed=args.seed, numpy_random_seed=args.seed,
                                      fewshot_random_seed=args.seed,
                                      confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    if results is None:   # ranks other than 0
        return None
    results["config"]["model_args"] = model_args
    results["config"]["model"] = "twotower"
    path = results_path(args.output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if results is not None:
        from lm_eval.utils import make_table
        print(make_table(results))
        print(f"results: {results_path(args.output_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
