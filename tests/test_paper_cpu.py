"""The paper preset end to end on the CPU (benchmarks/paper_run.py): Swin-L 384 through the
driver at tiny scale. 30-70 minutes on 2 shared cores, so it is marked slow: ``make test``
skips it, ``make test-slow`` runs it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import columns  # noqa: E402
import paper_run  # noqa: E402


@pytest.mark.slow
def test_paper_preset_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    args = paper_run.get_args_parser().parse_args(["--out-dir", str(tmp_path / "run")])
    result = paper_run.main(args)
    assert result["rc"] == 0, Path(result["log"]).read_text()[-3000:]
    run = columns.RunDir(tmp_path / "run")
    stems = [columns.AGE_MODEL] + [columns.fracture_model(r) for r in ("agegroup0", "agegroup1", "agegroup2",
                                                                      columns.POOLED_ROLE)]
    for stem in stems:
        assert (run.models_dir / (stem + columns.CHECKPOINT_SUFFIX)).is_file(), stem
    assert run.metrics_json.is_file() and (run.root / "report" / "report.md").is_file()
    # the checkpoint is the paper's model, trained with the paper preset's settings, from the file
    ckpt = torch.load(run.models_dir / (columns.fracture_model("agegroup0") + columns.CHECKPOINT_SUFFIX),
                      map_location="cpu", weights_only=True, mmap=True)
    cfg = ckpt["config"]
    assert ckpt["model_name"].startswith("swin_large_patch4_window12_384") and ckpt["img_size"] == 384
    assert (cfg["preset"], cfg["scheduler"], cfg["drop_path"], cfg["channels_last"], cfg["fused_attn"]) == \
        ("paper", "plateau", 0.1, True, True)
    assert cfg["pretrained_file"] == str(tmp_path / "run" / f"{paper_run.MODEL}_in22k_standin.safetensors")
    log = Path(result["log"]).read_text()
    assert "estimate from the first" in log and " 0.0 img/s" not in log
    assert all(row["s_per_train_step"] > 0 for row in result["models"]) and len(result["models"]) == 5
