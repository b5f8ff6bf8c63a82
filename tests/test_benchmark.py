"""benchmark.py smoke test: the smallest run of every section on the CPU writes the JSON it returns."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import benchmark


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_parse_variant() -> None:
    v = benchmark.parse_variant("bf16+cl+compile")
    assert v == {"name": "bf16+cl+compile", "precision": "bf16", "channels_last": True, "compile": True,
                 "fused_attn": False, "fused_opt": None, "batch": None}
    assert benchmark.parse_variant("fp32")["channels_last"] is False
    v = benchmark.parse_variant("BF16+fa+foreach@96")
    assert (v["name"], v["fused_attn"], v["fused_opt"], v["batch"]) == ("bf16+fa+foreach@96", True, False, 96)
    with pytest.raises(ValueError, match="unknown token"):
        benchmark.parse_variant("fp32+turbo")
    with pytest.raises(ValueError, match="positive integer"):
        benchmark.parse_variant("fp32@0")


def test_benchmark_smallest_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args([
        "--quick", "--device", "cpu", "--model", "cnn_demo", "--img-size", "32", "--batch-size", "2",
        "--data-sizes", "32", "--phantom-patients", "1", "--phantom-size", "96", "--workers", "0",
        "--sections", "data,flops,train,e2e", "--variants", "fp32,bf16+cl,fp32+fa@3,fp32+compile",
        "--fast-variant", "best",
        # a one-second cap: the compile variant is skipped with a note (or, from a warm
        # inductor cache, measured) but never fails the run
        "--compile-timeout", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--threads", "2",
    ])
    result = benchmark.main(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["sections"] == ["data", "flops", "train", "e2e"]
    assert result["machine"]["device"] == "cpu"
    assert result["machine"]["torch_threads"] == 2  # --threads (the suite runs on one thread)

    rows = result["data"]["rows"]
    assert {(r["img_size"], r["mode"]) for r in rows} == {(32, "uncached"), (32, "cached")}
    assert all(_positive(r["images_per_s"]) for r in rows)
    assert _positive(result["data"]["cached_speedup"]["32"])
    assert _positive(result["data"]["cache_disk"]["32"]["mb_per_image"])

    fl = result["flops"]
    for key in ("forward_flops_per_image", "train_flops_per_image", "peak_tflops", "params_m"):
        assert _positive(fl[key]), key
    assert fl["train_flops_per_image"] > fl["forward_flops_per_image"]

    train = {r["variant"]: r for r in result["train"]}
    assert list(train) == ["fp32", "bf16+cl", "fp32+fa@3", "fp32+compile"]
    for name in ("fp32", "bf16+cl", "fp32+fa@3"):
        r = train[name]
        for key in ("train_images_per_s", "infer_images_per_s", "peak_mem_mb", "achieved_tflops", "mfu",
                    "train_images_per_cpu_s", "infer_images_per_cpu_s"):
            assert _positive(r[key]), (name, key)
        assert r["batch_size"] == (3 if name.endswith("@3") else 2)
    compiled = train["fp32+compile"]
    assert _positive(compiled.get("train_images_per_s")) or "skipped" in compiled["note"]

    e2e = result["e2e"]
    fastest = max((r for r in result["train"] if "compile" not in r["variant"]),
                  key=lambda r: r["train_images_per_s"])["variant"].partition("@")[0]
    assert [(r["variant"], r["loader"]) for r in e2e["rows"]] == [("fp32", "uncached"), (fastest, "cached")]
    assert all(_positive(r["images_per_s"]) for r in e2e["rows"])
    assert _positive(e2e["speedup"])
    assert _positive(result["wall_s"])
    # on the CPU only the data targets apply (MFU and end-to-end are H100 targets)
    assert "bf16_mfu" not in result["targets"]


def test_stage1check_section(tmp_path: Path) -> None:
    # 12 phantom patients (39 images) copied ten times: every age group in both splits
    argv = ["--device", "cpu", "--sections", "stage1check", "--check-files", "400", "--phantom-patients", "12",
            "--phantom-size", "96", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "b.json")]
    result = benchmark.main(benchmark.get_args_parser().parse_args(argv))
    s1 = result["stage1check"]
    assert s1["files"] == 400 and s1["image"][0] == 96 and s1["image"][2] == 16
    assert [r["check"] for r in s1["rows"]] == ["cheap", "decode"]
    for r in s1["rows"]:  # stage 1's own report of its check, read back from its manifest
        assert r["files"] == 400 and r["threads"] >= 1 and _positive(r["stage1_wall_s"]) and r["seconds"] >= 0
    folder = tmp_path / "work" / "stage1check"
    assert len(list((folder / "images").glob("*.png"))) == 400
    assert "image check (decode" in (folder / "stage1_decode.log").read_text()
    marker = (folder / "files.json").stat().st_mtime_ns
    benchmark.main(benchmark.get_args_parser().parse_args(argv))  # the files are reused
    assert (folder / "files.json").stat().st_mtime_ns == marker


def test_readme_scale_table_is_what_scale_projection_prints() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "scale_projection.py"
    # the standard library only: both runs took 0.4 s at load 15; 60 s is 100x
    printed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                             timeout=60).stdout.strip()
    readme = (repo / "README.md").read_text()
    start, end = "<!-- benchmarks/scale_projection.py -->\n", "\n<!-- /benchmarks/scale_projection.py -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == printed
    # the projection follows its inputs: more GPUs cost less, the 50-epoch cap more
    numbers = json.loads(subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True,
                                        check=True, timeout=60).stdout)
    totals = [c["total"] for c in numbers["projected"]["configs"]]
    assert totals[0] > totals[1] > totals[2]
    assert all(c["total_cap"] > c["total"] for c in numbers["projected"]["configs"])
    assert numbers["measured"]["train_fa64"] > numbers["measured"]["train_cl64"]  # read from the JSON files
