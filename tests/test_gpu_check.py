"""experiments/gpu_check.py in its CPU smoke mode (toy sizes, Pallas interpreted): every section runs and
writes numbers into the JSON and the table. What it measures on a GPU is not tested here."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import jax

from twotower_jax.ops.ssd_mosaic import interpret_unavailable

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_smoke_run_writes_every_section_with_numbers(tmp_path):
    gpu_check = _load_script("gpu_check")
    _, path = gpu_check.run(smoke=True, budget_s=600, out_dir=str(tmp_path))
    assert Path(path).name == "gpu_check_cpu_smoke.json"
    data = json.loads(Path(path).read_text())
    meta, sections = data["meta"], data["sections"]
    assert meta["smoke"] and meta["jax"] == jax.__version__ and meta["device_kind"] == "cpu"
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, entry in sections.items():
        assert entry["status"] in ("ok", "partial"), (name, entry.get("error"))
        ok = [r for r in entry["rows"] if r["status"] == "ok"]
        assert ok and all(any(_number(v) for k, v in r.items() if k not in ("batch", "length")) for r in ok), name

    ssd = {(r["impl"], r["mode"]): r for r in sections["ssd"]["rows"]}
    for impl in ("sequential", "chunked", "pallas"):
        assert ssd[(impl, "fwd")]["status"] == "ok" and ssd[(impl, "fwd")]["max_rel_err_vs_reference"] < 1e-4
    mosaic = ssd[("pallas_mosaic", "fwd")]
    if interpret_unavailable() is None:   # Mosaic GPU interpreter (jax >= 0.12): bf16 operands
        assert mosaic["status"] == "ok" and mosaic["max_rel_err_vs_reference"] < 2e-2
    else:                                 # the reason is recorded, the other impls still ran
        assert mosaic["status"] == "error" and "interpret" in mosaic["error"]
    assert all(r["status"] == "ok" and r["max_rel_err_vs_dense"] < 1e-2 for r in sections["moe"]["rows"])
    long_decode = {r["attention_keys"]: r for r in sections["long_decode"]["rows"]}
    assert set(long_decode) == {"tiles_128", "tiles_1024", "one_tile", "fused"}
    assert all(r["status"] == "ok" and r["tokens_equal_default"] for r in long_decode.values()), long_decode
    tower = {(r["phase"], r["scan"]): r for r in sections["tower"]["rows"]}
    assert tower[("prefill", "pallas")]["max_rel_err_vs_chunked"] < 2e-2
    assert tower[("decode", "auto")]["tokens_per_s"] > 0
    assert {r["mode"] for r in sections["samplers"]["rows"] if r["tokens_per_s"] > 0} == {"ar", "mock_ar", "diffusion"}
    plan = [r for r in sections["memory_plan"]["rows"] if r["status"] == "ok"]
    assert plan and all(_number(r["temp_gib"]) for r in plan)

    table = Path(path).with_suffix(".md").read_text()
    assert "SMOKE RUN" in table
    for name in gpu_check.SECTIONS:
        assert f"## {name}: " in table
