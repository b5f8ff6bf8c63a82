"""Models by name, demo models, pretrained files, offline failure, checkpoints (all CPU, tiny)."""
from __future__ import annotations

import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

import models
from models import CheckpointError, PretrainedWeightsError

LEGACY = "swin_large_patch4_window12_384_in22k"
CURRENT = "swin_large_patch4_window12_384.ms_in22k"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    # never download: offline hub, empty caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- names and demo models


def test_legacy_name_resolves_to_current_timm_name():
    assert models.resolve_model_name(LEGACY) == CURRENT
    assert models.resolve_model_name(CURRENT) == CURRENT
    assert models.resolve_model_name("swin_demo") == "swin_demo"
    cfg = timm.models.get_pretrained_cfg(CURRENT)
    assert cfg.hf_hub_id == f"timm/{CURRENT}" and tuple(cfg.input_size) == (3, 384, 384)
    assert timm.models.is_model_pretrained(CURRENT)


def test_legacy_name_builds_swin_large():
    # the real architecture, built on the meta device: same module graph, no 800 MB of memory
    model = models.create_model(LEGACY, num_classes=2, in_chans=1, img_size=384, device="meta")
    assert isinstance(model, SwinTransformer)
    assert model.patch_embed.proj.weight.shape == (192, 1, 4, 4)
    assert model.head.fc.weight.shape == (2, 1536)
    assert model.layers[0].blocks[0].window_size == (12, 12)
    assert 190e6 < _params(model) < 200e6


def test_unknown_names_refused_with_suggestion():
    with pytest.raises(ValueError, match="did you mean.*swin_large_patch4_window12_384"):
        models.resolve_model_name("swin_large_patch4_window12_348")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        models.resolve_model_name("swin_large_patch4_window12_384.no_such_tag")


@pytest.mark.parametrize("name", ["swin_demo", "swin_demo_patchify", "cnn_demo"])
def test_demo_models_forward_and_size(name):
    assert name in timm.list_models("*demo*")  # registered with timm, so timm.create_model builds it
    model = models.create_model(name, num_classes=3, img_size=64).eval()
    assert _params(model) < 1_000_000
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_swin_demo_forward_backward_on_64px():
    torch.manual_seed(0)
    model = models.create_model("swin_demo", num_classes=2, in_chans=1, img_size=64,
                                weights=models.WeightsOptions(drop_path_rate=0.1, grad_checkpointing=True))
    assert isinstance(model, SwinTransformer)
    # windows divide every stage's map at 64 px: 16x16, 8x8, 4x4 tokens
    assert [stage.blocks[0].window_size for stage in model.layers] == [(8, 8), (8, 8), (4, 4)]
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_fused_attention_is_the_same_function():
    # 128 px gives swin_demo shifted 8x8 windows, so the shift mask goes through SDPA too
    from torch.utils._python_dispatch import TorchDispatchMode

    class AtenOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = models.create_model("swin_demo", num_classes=2, img_size=128)
    assert any(getattr(b, "shift_size", (0, 0)) != (0, 0) for b in model.modules())
    x = torch.randn(2, 1, 128, 128)
    runs = []
    for fused in (False, True):
        assert models.use_fused_attention(model, fused) == 6
        model.zero_grad()
        with AtenOps() as ops:
            out = model(x)
            out.sum().backward()
        bias_grad = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                               if "relative_position_bias_table" in n])
        runs.append((out.detach(), bias_grad, ops.seen))
    (out0, g0, ops0), (out1, g1, ops1) = runs
    assert ops0 != ops1  # the switch really changes the kernels that run
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    assert g0.abs().max() > 0
    built = models.create_model("swin_demo", num_classes=2, img_size=128,
                                weights=models.WeightsOptions(fused_attn=True))
    assert all(b.fused_attn for b in built.modules() if hasattr(b, "fused_attn"))
    assert models.use_fused_attention(models.create_model("cnn_demo", num_classes=2)) == 0


# --------------------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_pretrained_file_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    source = models.create_model("swin_demo", num_classes=1000, in_chans=3, img_size=64).eval()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)

    same = models.create_model("swin_demo", num_classes=1000, in_chans=3, img_size=64,
                                weights=models.WeightsOptions(pretrained_file=path))
    for (k, a), (_, b) in zip(source.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k

    # grayscale + new head: timm sums the RGB stem kernels, so the features equal those of the
    # RGB network on the gray image replicated to 3 channels; the 1000-class head is dropped
    gray = models.create_model("swin_demo", num_classes=2, in_chans=1, img_size=64,
                                weights=models.WeightsOptions(pretrained_file=path)).eval()
    stem = "patch_embed.proj.0.weight"
    torch.testing.assert_close(gray.state_dict()[stem], source.state_dict()[stem].sum(1, keepdim=True))
    assert gray.head.fc.weight.shape == (2, 128)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray.forward_features(x), source.forward_features(x.repeat(1, 3, 1, 1)),
                                   rtol=1e-4, atol=1e-4)


def test_pretrained_file_of_another_architecture_refused(tmp_path):
    path = tmp_path / "cnn.pth"
    torch.save(models.create_model("cnn_demo", num_classes=2).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"cnn\.pth: only 0% of the weights of 'swin_demo'"):
        models.create_model("swin_demo", num_classes=2, img_size=64,
                            weights=models.WeightsOptions(pretrained_file=path))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        models.create_model("swin_demo", num_classes=2, img_size=64,
                            weights=models.WeightsOptions(pretrained_file=tmp_path / "missing.pth"))


def _assert_howto(message: str) -> None:
    assert "\n" not in message
    for needle in ("--pretrained-file PATH", "--no-pretrained", f"https://huggingface.co/timm/{CURRENT}"):
        assert needle in message


def test_missing_weights_offline_fail_fast():
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        models.create_model(LEGACY, num_classes=2, img_size=384, weights=models.WeightsOptions(pretrained=True))
    # refused before any model is built: 0.01-0.02 s measured at load 11 on 2 cores; the 10 s
    # bound (500x) only tells an immediate refusal from a wait on the network
    assert time.monotonic() - start < 10
    assert "HF_HUB_OFFLINE" in str(info.value)
    _assert_howto(str(info.value))


def test_missing_weights_unreachable_hub_fail_fast(monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=f"cannot connect to 127.0.0.1:{port}") as info:
        models.create_model(LEGACY, num_classes=2, img_size=384, weights=models.WeightsOptions(pretrained=True))
    # 0.02 s measured at load 11; 10 s (500x) is far below huggingface_hub's retries and
    # timeouts, which are what this guards against
    assert time.monotonic() - start < 10
    _assert_howto(str(info.value))


def test_cached_hub_weights_used_offline():
    # weights already in the Hugging Face cache are used without touching the network
    import huggingface_hub.constants

    name = "resnet10t.c3_in1k"  # a real timm hub model, small enough to build in a test
    torch.manual_seed(0)
    source = models.create_model(name, num_classes=1000, in_chans=3)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--timm--resnet10t.c3_in1k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    safetensors.torch.save_file(source.state_dict(), repo / "snapshots" / commit / "model.safetensors")

    loaded = models.create_model(name, num_classes=1000, in_chans=3, weights=models.WeightsOptions(pretrained=True))
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_demo_model_has_no_hub_weights():
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights for model 'swin_demo'.*--no-pretrained"):
        models.create_model("swin_demo", num_classes=2, img_size=64, weights=models.WeightsOptions(pretrained=True))


# --------------------------------------------------------------------------- checkpoints


def _tiny_checkpoint(num_classes: int = 2, **overrides):
    torch.manual_seed(0)
    model = models.create_model("swin_demo", num_classes=num_classes, in_chans=1, img_size=32).eval()
    spec = models.ModelSpec(model_name="swin_demo", kind="fracture", class_names=[f"c{i}" for i in range(num_classes)],
                            img_size=32, mean=0.5, std=0.25, age_bounds=(8.0, 15.0))
    ckpt = models.make_checkpoint(
        model, spec,
        config={"out_dir": Path("/some/where"), "lr": np.float32(1e-3), "groups": (0, 2), "epochs": np.int64(3)},
        metrics={"val_f1": np.float64(0.75), "cm": np.array([[3, 1], [0, 4]])}, epoch=np.int64(4),
    )
    ckpt.update(overrides)
    return model, ckpt


def test_checkpoint_round_trip_weights_only(tmp_path):
    model, ckpt = _tiny_checkpoint()
    path = models.save_checkpoint(tmp_path / "sub" / "fracture_classifier_agegroup0.pt", ckpt)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain torch can read it
    assert set(models.CHECKPOINT_KEYS) <= set(raw)
    assert raw["config"] == {"out_dir": "/some/where", "lr": pytest.approx(1e-3), "groups": [0, 2], "epochs": 3}
    assert raw["metrics"]["cm"] == [[3, 1], [0, 4]] and type(raw["metrics"]["val_f1"]) is float
    assert raw["age_bounds"] == [8.0, 15.0] and raw["format_version"] == models.CHECKPOINT_FORMAT_VERSION
    assert "torch" in raw["versions"]

    loaded = models.load_checkpoint(path, expect={"kind": "fracture", "num_classes": 2, "img_size": 32,
                                                  "model_name": "swin_demo", "age_bounds": (8.0, 15.0)})
    rebuilt = models.build_from_checkpoint(loaded)
    assert not rebuilt.training
    models.use_fused_attention(model)  # as rebuilt is: compare the weights, not two kernels' rounding
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    with torch.no_grad():  # building from the path does the same
        assert torch.equal(model(x), models.build_from_checkpoint(path)(x))


def test_resumable_state_with_optimizer_round_trips(tmp_path):
    model, ckpt = _tiny_checkpoint()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    ckpt.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng_torch=torch.get_rng_state())
    path = models.save_checkpoint(tmp_path / "last.pt", ckpt)
    loaded = models.load_checkpoint(path)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(loaded["rng_torch"], ckpt["rng_torch"])


def test_save_refuses_values_weights_only_load_would_reject(tmp_path):
    class Custom:
        pass

    _, ckpt = _tiny_checkpoint(extra_state={"sampler": Custom()})
    with pytest.raises(TypeError, match=r"checkpoint\['extra_state'\]\['sampler'\].*Custom"):
        models.save_checkpoint(tmp_path / "x.pt", ckpt)
    _, ckpt = _tiny_checkpoint(kind="age group")
    with pytest.raises(ValueError, match="kind"):
        models.save_checkpoint(tmp_path / "x.pt", ckpt)
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_refused(tmp_path):
    _, ckpt = _tiny_checkpoint()
    path = models.save_checkpoint(tmp_path / "age_classifier.pt", ckpt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        models.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "truncated" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="truncated"):
        models.build_from_checkpoint(path)


class _Payload:
    """Unpickling this runs code: writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_custom_objects_refused_not_executed(tmp_path):
    _, ckpt = _tiny_checkpoint()
    ckpt = torch.load(models.save_checkpoint(tmp_path / "good.pt", ckpt), weights_only=True)
    marker = tmp_path / "executed"
    ckpt["config"] = _Payload(str(marker))
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)  # torch.save pickles anything; load must not run it
    refused = r"evil\.pt: refused to load: the pickle references \S+, but only tensors"
    with pytest.raises(CheckpointError, match=refused) as info:
        models.load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()

    plain = tmp_path / "plain.pkl"  # a classic pickle, not a torch zip
    with open(plain, "wb") as fh:
        pickle.dump(_Payload(str(marker)), fh)
    with pytest.raises(CheckpointError, match=r"plain\.pkl: "):
        models.load_checkpoint(plain)
    assert not marker.exists()


def test_foreign_and_incomplete_files_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt: "):
        models.load_checkpoint(text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint dict"):
        models.load_checkpoint(tensor)
    bare = tmp_path / "state_dict.pt"
    torch.save(models.create_model("cnn_demo", num_classes=2).state_dict(), bare)
    with pytest.raises(CheckpointError, match="missing keys model, model_name"):
        models.load_checkpoint(bare)
    with pytest.raises(CheckpointError, match="not found"):
        models.load_checkpoint(tmp_path / "nope.pt")


def test_wrong_class_count_and_other_expectations_refused(tmp_path):
    _, ckpt = _tiny_checkpoint()
    path = models.save_checkpoint(tmp_path / "m.pt", ckpt)
    with pytest.raises(CheckpointError, match=r"m\.pt: num_classes is 2, expected 3"):
        models.load_checkpoint(path, expect={"num_classes": 3})
    with pytest.raises(CheckpointError, match="model_name is 'swin_demo', expected 'cnn_demo'"):
        models.load_checkpoint(path, expect={"model_name": "cnn_demo"})
    with pytest.raises(CheckpointError, match="img_size is 32, expected 384"):
        models.load_checkpoint(path, expect={"img_size": 384})

    # a file whose metadata claims 3 classes but whose weights have 2: refused, no traceback
    ckpt3 = dict(ckpt, num_classes=3, class_names=["a", "b", "c"])
    path3 = models.save_checkpoint(tmp_path / "m3.pt", ckpt3)
    with pytest.raises(CheckpointError) as info:
        models.build_from_checkpoint(path3)
    message = str(info.value)
    assert message.startswith(f"{path3}: weights do not fit swin_demo (num_classes=3")
    assert "head.fc.weight has shape [2, 128] in the file but [3, 128] in the model" in message
    assert "\n" not in message

    # another architecture under the same name
    ckpt_cnn = dict(ckpt, model=models.create_model("cnn_demo", num_classes=2).state_dict())
    path_cnn = models.save_checkpoint(tmp_path / "cnn.pt", ckpt_cnn)
    with pytest.raises(CheckpointError, match=r"weights missing .*unexpected weights"):
        models.build_from_checkpoint(path_cnn)


def test_legacy_model_name_in_checkpoint_matches_expectation(tmp_path):
    _, ckpt = _tiny_checkpoint()
    path = models.save_checkpoint(tmp_path / "legacy.pt", dict(ckpt, model_name=LEGACY))  # as an older run wrote it
    assert models.load_checkpoint(path, expect={"model_name": CURRENT})["model_name"] == LEGACY
