"""Two torchrun "nodes" on one machine: the README's two-node commands, run for real.

Two separate torchrun launchers (``--nnodes 2``, one gloo process each) meet at a c10d
rendezvous on localhost, as two machines would at ``HOST0``. They train the pooled
fracture model and then run the evaluation. Checked:

* training: the weights are bit-identical to ``torchrun --standalone --nproc_per_node 2``
  on the same data and flags (same world size and ranks; only the launch topology
  differs), and the validation metrics the two nodes stored in the checkpoint are the
  ones a single process computes for those weights;
* evaluation: ``test_predictions.csv`` equals a single process's;
* afterwards: no lock file, nothing listening on the rendezvous port, and no process
  of either launcher (launcher, worker or anything they started) still alive.

A one-process TRAINING run is not the reference: DDP with two ranks normalises each
rank's batch by its own BatchNorm statistics, draws per-rank augmentations and shards
the sampler's draws, so it is a different (equally valid) computation.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

import columns
import engine
import evaluate
import models
import recipe
import tables
import unified_dataset

REPO = Path(__file__).resolve().parents[1]
# The launcher line of README "One GPU, several GPUs, several nodes"; the test runs it with
# HOST0 -> localhost, 29500 -> a free port, 8 -> 1 process per node.
README_LAUNCH = ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                 "--rdzv_endpoint HOST0:29500 --rdzv_id wrist")
TINY = ["--img-size", "32", "--batch-size", "8", "--epochs", "2", "--quiet", "--device", "cpu"]
EVAL_FLAGS = ["--n-boot", "20", "--n-cam", "1", "--batch-size", "8", "--device", "cpu"]
MARKER = "WRIST_TWO_NODE_TEST"
# per launcher wait (training, then evaluation): the whole test took 217 s at load 15 on 2
# cores, so 900 s (4x the whole test) only stops a hang
TIMEOUT_S = 900
POOLED = columns.model_files(columns.fracture_model(columns.POOLED_ROLE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(port: int) -> list[str]:
    argv = shlex.split(README_LAUNCH.replace("HOST0:29500", f"localhost:{port}"))
    argv[argv.index("--nproc_per_node") + 1] = "1"
    assert argv[0] == "torchrun"  # the same entry point, without relying on PATH
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]


def _env(tag: str) -> dict[str, str]:
    # the tag is inherited by everything the launchers start, so leftovers can be found
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", MARKER: tag}


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``MARKER=tag`` (Linux /proc)."""
    needle = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill_tagged(tag: str) -> None:
    for pid in _tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(cmd: list[str], tag: str, log: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=_env(tag), stdout=fh, stderr=subprocess.STDOUT), log


def _wait(jobs: list[tuple[subprocess.Popen, Path]], tag: str) -> list[str]:
    """Wait for every launcher; their logs, after asserting that each exited 0."""
    try:
        codes = [proc.wait(timeout=TIMEOUT_S) for proc, _ in jobs]
    except subprocess.TimeoutExpired:
        _kill_tagged(tag)
        raise
    texts = [log.read_text() for _, log in jobs]
    for (_, log), code, text in zip(jobs, codes, texts):
        assert code == 0, f"{log.name}: exit code {code}\n{text[-4000:]}"
    return texts


def _two_nodes(script: str, argv: list[str], port: int, tag: str, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Both launchers started at once, as on two machines (node 0, node 1)."""
    cmd = [*_launcher(port), str(REPO / script), *argv]
    return [_start(cmd, tag, logs / f"{Path(script).stem}_node{node}.log") for node in (0, 1)]


def _port_listened(port: int) -> bool:
    """True if some socket LISTENs on ``port`` (any address, IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _can_listen(port: int) -> bool:
    # SO_REUSEADDR: a TIME_WAIT left by closed connections does not count, a listener does
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        except OSError:
            return False
    return True


def _save_age_classifier(models_dir: Path) -> None:
    """A seeded, untrained age classifier: evaluation needs one; its quality is irrelevant here."""
    torch.manual_seed(0)
    net = models.create_model("cnn_demo", num_classes=3, in_chans=1, img_size=32)
    spec = models.ModelSpec(model_name="cnn_demo", kind="age", class_names=list(columns.AGE_GROUP_NAMES),
                            img_size=32, mean=0.449, std=0.226, age_bounds=list(columns.AGE_BOUNDS))
    ckpt = models.make_checkpoint(net, spec, metrics={}, epoch=1)
    models.save_checkpoint(models_dir / (columns.AGE_MODEL + columns.CHECKPOINT_SUFFIX), ckpt)


def _single_process_val_metrics(ckpt_path: Path, val_csv: Path, cache_dir: Path) -> dict:
    """engine.evaluate of the checkpoint's weights on the whole validation CSV, in this process."""
    ckpt = models.load_checkpoint(ckpt_path)
    model = models.build_from_checkpoint(ckpt, torch.device("cpu"), source=str(ckpt_path))
    size = ckpt["img_size"]
    ds = unified_dataset.WristDataset(tables.read_split_csv(val_csv), "fracture",
                         unified_dataset.build_transforms(size, train=False, mean=ckpt["mean"], std=ckpt["std"]), size,
                         cache_dir=cache_dir)
    cfg, cpu = ckpt["config"], torch.device("cpu")
    if cfg["channels_last"]:  # the precision and layout the trainer validated with
        model = model.to(memory_format=torch.channels_last)
    criterion = recipe.make_criterion(cfg["loss"], 2, cfg["focal_alpha"], cfg["focal_gamma"])
    compute = engine.Compute(cpu, engine.resolve_amp(cfg["amp"], cpu), cfg["channels_last"])
    return engine.evaluate(model, recipe.make_loader(ds, 8, train=False), criterion, compute).metrics


def test_readme_documents_the_two_node_commands_this_test_runs():
    text = (REPO / "README.md").read_text()
    for script in ("train_fracture_per_agegroup.py", "evaluate.py"):
        assert f"{README_LAUNCH} \\\n    {script}" in text, script


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process and port checks read /proc")
def test_two_nodes_train_and_evaluate_like_one_job(fresh_splits: Path, tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = fresh_splits  # the two-node run's output directory (shared by both "nodes")
    standalone = tmp_path / "standalone"
    shutil.copytree(fresh_splits, standalone)
    tag = uuid.uuid4().hex
    port = _free_port()
    try:
        # ---- training: two nodes and, at the same time, the same job from one standalone launcher
        standalone_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2", str(REPO / "train_fracture_per_agegroup.py"), "--out-dir", str(standalone),
                          "--pooled", *TINY]
        jobs = _two_nodes("train_fracture_per_agegroup.py", ["--out-dir", str(nodes), "--pooled", *TINY],
                          port, tag, logs)
        jobs.append(_start(standalone_cmd, tag, logs / "standalone.log"))
        # the leftover check below finds what it should: the running launchers carry the tag
        assert {proc.pid for proc, _ in jobs} <= set(_tagged_pids(tag))
        train_logs = _wait(jobs, tag)[:2]

        # ---- evaluation: two nodes against one process on a copy of the same inputs
        _save_age_classifier(columns.RunDir(nodes).models_dir)
        single = tmp_path / "single"
        shutil.copytree(nodes, single, ignore=shutil.ignore_patterns(columns.CACHE_DIR, ".run.lock"))
        eval_logs = _wait(_two_nodes("evaluate.py", ["--out-dir", str(nodes), *EVAL_FLAGS], port, tag, logs), tag)
    finally:
        leftovers = _tagged_pids(tag)
        _kill_tagged(tag)

    # ---- nothing left behind
    assert leftovers == [], f"processes of the two-node run still alive: {leftovers}"
    assert not _port_listened(port) and _can_listen(port), f"port {port} is still in use"
    for run in (nodes, standalone):
        stray = sorted(str(p.relative_to(run)) for p in run.rglob("*")
                       if p.name.endswith((".lock", ".tmp")) or p.name.startswith(".stage"))
        assert stray == [], stray

    # ---- it really was two nodes, and rank 0 alone logged (on whichever node c10d made rank 0)
    launch = " ".join(_launcher(port))
    assert "--nnodes 2" in launch and "--nproc_per_node 1" in launch and "--standalone" not in launch
    for text in train_logs + eval_logs:
        assert "will be ignored" not in text  # every flag of the README line is used
    assert sum(t.count("[Epoch 1] Train Loss") for t in train_logs) == 1
    assert sum(t.count("sharded over 2 processes") for t in eval_logs) == 1
    rank0_node = [i for i, t in enumerate(train_logs) if "[Epoch 1] Train Loss" in t][0]

    # ---- training: the same weights as the standalone two-process job
    run, alone = columns.RunDir(nodes), columns.RunDir(standalone)
    a = models.load_checkpoint(run.models_dir / POOLED["best"], expect={"kind": "fracture"})
    b = models.load_checkpoint(alone.models_dir / POOLED["best"], expect={"kind": "fracture"})
    assert a["finished"] and b["finished"]
    assert list(a["model"]) == list(b["model"])
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differing == [], f"tensors differ from the standalone run: {differing}"
    assert a["epoch"] == b["epoch"] and a["metrics"] == b["metrics"]
    hist_cols = ["epoch", "lr", "train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1",
                 "val_auroc"]  # not seconds, images/s
    pd.testing.assert_frame_equal(
        pd.read_csv(run.models_dir / POOLED["history"])[hist_cols],
        pd.read_csv(alone.models_dir / POOLED["history"])[hist_cols],
        check_exact=True)
    # the metrics the two nodes gathered are what one process computes for those weights
    val = pd.read_csv(run.val_csv)
    mine = _single_process_val_metrics(run.models_dir / POOLED["best"], run.val_csv, run.cache_dir)
    stored = a["metrics"]
    assert stored["val_n"] == len(val) == mine["n"]
    assert stored["val_confusion_matrix"] == mine["confusion_matrix"]
    for k in ("acc", "f1", "auroc"):
        assert stored[f"val_{k}"] == pytest.approx(mine[k], rel=1e-6, nan_ok=True), k
    assert stored["val_loss"] == pytest.approx(mine["loss"], rel=1e-4)

    # ---- evaluation: every test row once, in order, the numbers of one process
    evaluate.main(evaluate.get_args_parser().parse_args(["--out-dir", str(single), *EVAL_FLAGS]))
    pred = pd.read_csv(run.predictions_csv)
    ref = pd.read_csv(columns.RunDir(single).predictions_csv)
    assert pred.image_path.tolist() == pd.read_csv(run.test_csv).image_path.tolist()
    pd.testing.assert_frame_equal(pred, ref, check_exact=True)
    metrics = json.loads(run.metrics_json.read_text())
    assert metrics["world_size"] == 2
    assert metrics["systems"] == json.loads(columns.RunDir(single).metrics_json.read_text())["systems"]

    print(f"\ntwo nodes on localhost:{port} (rank 0 on node {rank0_node}): pooled weights "
          f"bit-identical to --standalone --nproc_per_node 2 ({len(a['model'])} tensors), stored val "
          f"metrics = one process's (AUROC {stored['val_auroc']:.4f}, n {stored['val_n']}); "
          f"test_predictions.csv ({len(pred)} rows) identical to one process; no process, port or lock "
          f"left")
