"""GPU readiness that can be checked on CPU: mixed precision (``ray.precision``), the NCCL backend when
CUDA is there, decode threads and pinned copies (``ray.decode_workers``, ``ray.pin_memory``)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from sbir.config import ParamsError, RayParams
from sbir.train.precision import LoopDevice, autocast, check_before_start, fp32, grad_scaler, to_device

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- precision.py
def test_bf16_autocast_runs_matmuls_in_bf16_on_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
        assert torch.nn.functional.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32


def test_fp16_needs_cuda_and_says_so(monkeypatch):
    with pytest.raises(ValueError, match=r"ray.precision fp16 needs a CUDA device .*use bf16"):
        autocast(CPU, "fp16")
    with pytest.raises(ValueError, match="ray.precision fp16 needs a CUDA device"):
        LoopDevice(CPU, "fp16")
    # before Ray starts: only when the workers will get no GPU (use_gpu auto = whether CUDA is visible here)
    with pytest.raises(ParamsError, match="ray.precision fp16 needs CUDA workers"):
        check_before_start(RayParams(precision="fp16", use_gpu=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="no CUDA device is visible"):
        check_before_start(RayParams(precision="fp16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_before_start(RayParams(precision="fp16"))
    check_before_start(RayParams(precision="bf16", use_gpu=False))


def test_scaler_and_step_are_plain_in_fp32_and_bf16():
    for precision in ("fp32", "bf16"):
        scaler = grad_scaler(CPU, precision)
        loss = torch.tensor(2.5, requires_grad=True)
        assert not scaler.is_enabled() and scaler.scale(loss) is loss
    # LoopDevice.step = zero_grad, backward, step: bit-identical to the plain sequence in fp32
    x = torch.randn(6, 4)
    torch.manual_seed(0)
    plain, stepped = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    stepped.load_state_dict(plain.state_dict())
    opt_a, opt_b = torch.optim.AdamW(plain.parameters(), lr=0.1), torch.optim.AdamW(stepped.parameters(), lr=0.1)
    for _ in range(3):
        opt_a.zero_grad()
        plain(x).square().mean().backward()
        opt_a.step()
        LoopDevice(CPU).step(opt_b, stepped(x).square().mean(), stepped)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), stepped.parameters()))


def test_steps_inside_one_autocast_region_reach_the_next_forward():
    """autocast caches its bf16 copy of a weight for the whole region: LoopDevice.step drops it, so a
    region that covers several steps (fgsbir_joint's D warm-up) computes with the updated weights."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 4), torch.randn(8, 4)
    dev = LoopDevice(CPU, "bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with dev.autocast():
        before = model(x)
        dev.step(opt, before.float().square().mean(), model)
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.allclose(after.float(), model(x), atol=0.05)  # what fp32 computes with the new weights


def test_fp32_losses_leave_autocast():
    seen = {}

    @fp32
    def loss(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        seen["dtypes"] = (a.dtype, b.dtype)
        return (a @ b.T).logsumexp(1).mean() * scale

    a, b = torch.randn(4, 8).bfloat16(), torch.randn(5, 8)
    with autocast(CPU, "bf16"):
        out = loss(a, b=b, scale=2.0)
        assert torch.is_autocast_enabled("cpu")  # restored after the loss
    assert seen["dtypes"] == (torch.float32, torch.float32) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- NCCL when CUDA is there
@pytest.mark.parametrize("num_workers", [0, 2])
def test_nccl_backend_and_gpu_workers_when_cuda_is_present(monkeypatch, tmp_path, num_workers):
    """The TorchTrainer the runtime builds: NCCL and a GPU per worker when CUDA is visible (use_gpu auto),
    gloo on CPU. Built only, never run: no Ray instance is started."""
    from sbir.train import runtime as rt

    rt.ray_environment(RayParams(num_workers=0))
    monkeypatch.setattr(rt, "ensure_ray", lambda _params: None)
    for cuda, backend in ((True, "nccl"), (False, "gloo")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        trainer = rt._trainer("s", lambda _config: None, {}, RayParams(num_workers=num_workers), tmp_path,
                              rt.TrainingHooks())
        assert trainer.backend_config.backend == backend
        if num_workers:
            assert trainer.scaling_config.use_gpu is cuda
            assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, **({"GPU": 1} if cuda else {})}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer = rt._trainer("s", lambda _config: None, {}, RayParams(num_workers=num_workers, use_gpu=False), tmp_path,
                          rt.TrainingHooks())
    assert trainer.backend_config.backend == "gloo"


# ----------------------------------------------------------------------------- data loading
def test_decode_workers_give_the_same_tensors(tiny_dataset):
    from sbir.data.datasets import load_image_set
    from sbir.data.format import open_dataset

    ds = open_dataset(tiny_dataset)
    for table, kwargs in (("photos", {}), ("sketches", {"with_strokes": True, "image_size": 24})):
        serial = load_image_set(ds, table, ["train", "test"], **kwargs)
        threaded = load_image_set(ds, table, ["train", "test"], workers=3, **kwargs)
        assert len(serial) > 32  # more than one row group
        assert torch.equal(serial.images, threaded.images) and torch.equal(serial.labels, threaded.labels)
        assert serial.ids == threaded.ids and serial.photo_ids == threaded.photo_ids
        if table == "sketches":
            assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                       for a, b in zip(serial.strokes, threaded.strokes))


def test_pin_memory_is_a_no_op_without_cuda():
    x = torch.arange(12, dtype=torch.uint8).view(3, 4)
    assert to_device(x, CPU, pin_memory=True) is x and not x.is_pinned()
    assert LoopDevice(CPU, pin_memory=True).to(x) is x


# ----------------------------------------------------------------------------- a stage in bf16
def _teacher_params(tmp_path, tiny_dataset, precision: str) -> str:
    params = {"seed": 0, "dataset_dir": str(tiny_dataset), "outputs_dir": str(tmp_path / precision),
              "ray": {"num_workers": 0, "precision": precision},
              "teacher_pretrain": {"backbone": {"name": "small_cnn", "width": 8, "depth": 3}, "image_size": 32,
                                   "epochs": 4, "batch_size": 16}}
    path = tmp_path / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_teacher_pretrain_in_bf16_matches_fp32(tmp_path, tiny_dataset):
    """Tolerances from measurement (seeds 0-2, 4 epochs, this tiny set): the epoch-mean losses of bf16 and
    fp32 differed by at most 0.21 % (relative), the test accuracies by at most one of 32 test images.
    Allowed: 1 % and two images."""
    from sbir.stage import run_stage

    history = {}
    for precision in ("fp32", "bf16"):
        run_stage("teacher_pretrain", ["--params", _teacher_params(tmp_path, tiny_dataset, precision), "--no-mlflow"])
        history[precision] = json.loads((tmp_path / precision / "teacher_pretrain/history.json").read_text())
    for a, b in zip(history["fp32"], history["bf16"]):
        for k in ("photo_ce", "sketch_ce", "modality_ce"):
            assert math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=0.01, abs=1e-3), (a["epoch"], k)
        for k in ("photo_teacher_test_acc", "sketch_teacher_test_acc", "modality_net_test_acc"):
            assert abs(b[k] - a[k]) <= 2 / 32 + 1e-9, (a["epoch"], k)
    assert history["bf16"][-1]["sketch_ce"] < history["bf16"][0]["sketch_ce"]  # it trains


def test_fp16_stage_stops_before_ray_without_a_gpu(tmp_path, tiny_dataset):
    from sbir.stage import run_stage

    params = _teacher_params(tmp_path, tiny_dataset, "fp16")
    with pytest.raises(ParamsError, match="ray.precision fp16 needs CUDA workers"):
        run_stage("teacher_pretrain", ["--params", params, "--no-mlflow", "--set", "ray.use_gpu=false"])


def test_precision_is_part_of_a_training_stage_digest(tmp_path):
    """A run is resumed only with the same digest: an fp32 checkpoint is not continued in bf16. fp32
    digests stay those from before the key existed."""
    from sbir.config import Root
    from sbir.registry import get_stage
    from sbir.stage import stage_digest

    fp32_root, bf16_root = Root(ray=RayParams(precision="fp32")), Root(ray=RayParams(precision="bf16"))
    teacher, evaluate = get_stage("teacher_pretrain"), get_stage("evaluate")
    assert stage_digest(teacher, fp32_root) != stage_digest(teacher, bf16_root)
    assert stage_digest(evaluate, fp32_root) == stage_digest(evaluate, bf16_root)  # evaluation stays fp32
    assert stage_digest(teacher, fp32_root) == stage_digest(teacher, Root(ray=RayParams(precision="fp32",
                                                                                        pin_memory=True)))


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    """auto resolves to bf16 on a CPU with native bf16 (AVX512-BF16 / AMX) or a bf16 GPU, else fp32; an
    explicit precision is kept; a run's digest holds what auto resolved to (a bf16 run is not resumed
    on a machine that would compute it in fp32)."""
    from sbir.config import Root
    from sbir.registry import get_stage
    from sbir.stage import stage_digest
    from sbir.train import precision as P

    teacher = get_stage("teacher_pretrain")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(P, "native_bf16", lambda use_gpu, native=native: native)
        assert P.resolve(RayParams()).precision == expected  # the default is auto
        assert LoopDevice(CPU, "auto").precision == expected
        assert P.resolve(RayParams(precision="fp32")).precision == "fp32"
        assert P.resolve(RayParams(precision="bf16")).precision == "bf16"
        explicit = Root(ray=RayParams(precision=expected))
        assert stage_digest(teacher, Root()) == stage_digest(teacher, explicit)
    flags = "flags : fpu sse avx2 avx512f avx512_bf16\n"
    monkeypatch.undo()
    monkeypatch.setattr(P.Path, "read_text", lambda self: flags)
    assert P.native_bf16(use_gpu=False)
    monkeypatch.setattr(P.Path, "read_text", lambda self: "flags : fpu sse avx2 avx512f\n")
    assert not P.native_bf16(use_gpu=False)


def test_small_conv_nets_are_built_channels_last_and_compute_what_nchw_does():
    """The conv nets of the embedded pipeline keep their 4-d weights in NHWC (oneDNN skips the reorders:
    benchmarks/results/channels_last.json); the outputs equal the NCHW nets' up to float rounding."""
    import copy

    from sbir.fgsbir.joint import PairDiscriminator
    from sbir.models.backbones import SmallCNN
    from sbir.models.estimators import ConditionalEstimator

    torch.manual_seed(0)
    nets = {"small_cnn": (SmallCNN(8, 3), (torch.rand(4, 3, 32, 32),)),
            "estimator": (ConditionalEstimator(16, 5, 3, 8, 32), (torch.randn(4, 16), torch.tensor([0, 1, 2, 4]))),
            "discriminator": (PairDiscriminator(8), (torch.rand(4, 1, 32, 32), torch.rand(4, 3, 32, 32)))}
    for name, (net, inputs) in nets.items():
        weights = [w for w in net.parameters() if w.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights), name
        nchw = copy.deepcopy(net).to(memory_format=torch.contiguous_format).eval()
        torch.testing.assert_close(net.eval()(*inputs), nchw(*inputs), rtol=1e-4, atol=1e-5, msg=name)
