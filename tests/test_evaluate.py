"""lm-eval model `twotower` and `python -m twotower_jax.evaluate`, offline with local task YAMLs."""
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval 0.4.x)")

from twotower_jax import evaluate  # noqa: E402
from twotower_jax.engine import Engine, GenerationConfig, Request  # noqa: E402

WORDS = ["abcdefgh", "hgfedcba", "zyxwvuts", "qrstuvwx", "mnopqrst", "ghijklmn"]


def write_tasks(directory):
    mc = [{"prompt": f"copy {w}=", "choices": [w, w[::-1], w[1:] + w[0]], "label": 0} for w in WORDS]
    gen = [{"prompt": f"copy {w}=", "answer": w[:3]} for w in WORDS]
    for name, rows in (("mc", mc), ("gen", gen)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\ntest_split: test\n"
              f"target_delimiter: \"\"\ndoc_to_text: prompt\n")
    (directory / "demo_copy_mc.yaml").write_text(
        "task: demo_copy_mc\n" + common.format(path=directory / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    # until "def": the stop string straddles the boundary after token 4 (block_size 4 below)
    (directory / "demo_copy_gen.yaml").write_text(
        "task: demo_copy_gen\n" + common.format(path=directory / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"def\", \"stu\", \"ijk\", \"fed\", \"wvu\"]\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    write_tasks(directory)
    out = directory / "out"
    assert evaluate.main(["--checkpoint", "demo", "--tasks", "demo_copy_mc,demo_copy_gen", "--include-path",
                          str(directory), "--limit", "4", "--log-samples", "--output-path", str(out),
                          "--model-args", "mode=diffusion,block_size=4,steps_per_block=4,confidence_threshold=0.8"]
                         ) == 0
    return json.loads((out / "results.json").read_text())


def test_results_json_for_a_loglikelihood_and_a_generate_until_task(evaluated):
    results = evaluated["results"]
    assert set(results) >= {"demo_copy_mc", "demo_copy_gen"}
    assert 0 <= results["demo_copy_mc"]["acc,none"] <= 1
    assert 0 <= results["demo_copy_gen"]["exact_match,none"] <= 1
    assert evaluated["config"]["model"] == "twotower" and "mode=diffusion" in evaluated["config"]["model_args"]
    assert len(evaluated["samples"]["demo_copy_mc"]) == 4


def test_loglikelihood_through_lm_eval_equals_the_engine(evaluated):
    engine = Engine.load("demo")
    for sample in evaluated["samples"]["demo_copy_mc"]:
        doc = sample["doc"]
        direct = engine.loglikelihood([(doc["prompt"], choice) for choice in doc["choices"]])
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx([lp for lp, _ in direct], abs=1e-5)


def test_generate_until_stops_before_the_stop_string(evaluated):
    for sample in evaluated["samples"]["demo_copy_gen"]:
        text = sample["resps"][0][0]
        for stop in ("def", "stu", "ijk", "fed", "wvu"):
            assert stop not in text


@pytest.mark.parametrize("mode", ["ar", "mock_ar", "diffusion", "self_speculative"])
def test_generate_until_honours_until_across_blocks_in_every_mode(mode):
    from twotower_jax.lm_eval_model import TwoTowerLM
    engine = Engine.load("demo", batch_size=4)
    lm = TwoTowerLM(engine=engine, mode=mode, block_size=4, steps_per_block=4)
    prompts = ["copy abcdefgh=", "copy qrstuvwx="]
    config = GenerationConfig(mode=mode, max_new_tokens=12, block_size=4, steps_per_block=4,
                              confidence_threshold=0.9)
    free = [c.text for c in engine.generate([Request(id=i, prompt=p) for i, p in enumerate(prompts)], config)]
    stops = [t[3:6] for t in free]
    requests = [SimpleNamespace(args=(p, {"until": [s], "max_gen_toks": 12})) for p, s in zip(prompts, stops)]
    got = lm.generate_until(requests)
    checked = 0
    for text, stop, full in zip(got, stops, free):
        if len(full) >= 6:   # (mock-AR on the demo may end early: its denoiser never learnt that mode)
            assert text == full[:full.index(stop)]
            checked += 1
    assert checked or mode == "mock_ar"
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=("copy abc=abc",))])
    assert rolling[0] == pytest.approx(engine.loglikelihood_rolling(["copy abc=abc"], max_length=2048)[0])


def test_two_processes_score_like_one(evaluated, tmp_path):
    """lm-eval data parallel: 2 processes (jax.distributed, one CPU device each), rank/world_size from jax,
    gathers through its key-value store; process 0 writes the same metrics as the 1-process run."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    write_tasks(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=1"))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "twotower_jax.evaluate", "--checkpoint", "demo", "--tasks",
         "demo_copy_mc,demo_copy_gen", "--include-path", str(tmp_path), "--limit", "4", "--output-path",
         str(tmp_path / "out"), "--model-args", "mode=diffusion,block_size=4,steps_per_block=4,confidence_threshold=0.8",
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(k)],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for k in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    two = json.loads((tmp_path / "out" / "results.json").read_text())
    for task, metric in (("demo_copy_mc", "acc,none"), ("demo_copy_gen", "exact_match,none")):
        assert two["results"][task][metric] == evaluated["results"][task][metric]
    assert two["config"]["model"] == "twotower"


def test_task_index_is_the_include_path_alone_when_it_defines_every_task(tmp_path):
    from lm_eval.tasks import TaskManager
    write_tasks(tmp_path)
    local = evaluate.task_manager(TaskManager, str(tmp_path), ["demo_copy_mc", "demo_copy_gen"])
    assert set(local.all_tasks) == {"demo_copy_mc", "demo_copy_gen"}   # lm-eval's built-ins not indexed

    made = []

    class Recording:   # stands in for TaskManager: indexing the built-ins costs ~12 s
        def __init__(self, include_path=None, include_defaults=True):
            made.append(include_defaults)
            self.all_tasks = ["demo_copy_mc"] + (["arc_easy"] if include_defaults else [])

    assert evaluate.task_manager(Recording, str(tmp_path), ["demo_copy_mc", "arc_easy"]).all_tasks[-1] == "arc_easy"
    assert made == [False, True]
    made.clear()
    evaluate.task_manager(Recording, None, ["arc_easy"])
    assert made == [True]
