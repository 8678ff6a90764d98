"""Virtual devices: one process with V devices of B images each equals V gloo processes of B images each.

The contract: forward outputs, loss, every gradient and the running statistics after several steps, for
BN, SN (its fused path with the hand-written backward, and the traceable path) and GN, within float64
tolerance (float32 for what passes through Partial FC, whose margin maths runs in float32). Sample k of
the one-process batch sits on device k % V, the order in which the engine's sampler deals a global batch
to processes (process r takes samples r, r + W, ...).
"""
import copy
import io
from contextlib import redirect_stdout

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbones import SwitchNorm2d, build_backbone, split_batch_statistics
from backbones.virtual_devices import SplitBatchNorm1d, SplitBatchNorm2d
from data import generate_synthetic
from facerec.checkpoint import load_checkpoint
from facerec.config import ConfigError, load_config
from facerec.train import _allreduce_sum_hook, train
from losses import build_head

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICES, PER_DEVICE, STEPS, CLASSES = 4, 2, 3, 6
BATCH = DEVICES * PER_DEVICE


def problem():
    """Fixed float64 batches (STEPS of them) and labels."""
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    labels = [torch.randint(0, CLASSES, (BATCH,), generator=g) for _ in range(STEPS)]
    return images, labels


def make_model(norm: str):
    torch.manual_seed(0)
    backbone = build_backbone("iresnet18", norm=norm, embedding_size=8, input_size=32, width=4).double()
    head = build_head({"type": "cosface", "scale": 8.0, "margin": 0.2}, embedding_size=8,
                      num_classes=CLASSES).double()
    centres = torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    head.load_state_dict({"weight": centres})  # each process keeps its shard of the same centres
    return backbone, head


def train_steps(backbone, model, head, rows) -> dict:
    """STEPS SGD steps on ``batch[rows]``; per step the embeddings, loss and every gradient."""
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1, momentum=0.9)
    record = {"embeddings": [], "loss": [], "grads": []}
    for images, labels in zip(*problem()):
        embeddings = model(images[rows])
        loss = head(embeddings, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        record["embeddings"].append(embeddings.detach())
        record["loss"].append(loss.item())
        record["grads"].append({n: p.grad.clone() for n, p in backbone.named_parameters()
                                if p.grad is not None})
        optimizer.step()
    record["buffers"] = {n: b.clone() for n, b in backbone.named_buffers()}
    return record


NORMS = ("bn", "sn", "gn")


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=DEVICES)
    try:
        for norm in NORMS:
            backbone, head = make_model(norm)
            model = DistributedDataParallel(backbone, broadcast_buffers=False)
            model.register_comm_hook(None, _allreduce_sum_hook)
            record = train_steps(backbone, model, head, slice(rank, None, DEVICES))
            torch.save(record, f"{out_dir}/{norm}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """What each of DEVICES gloo processes recorded, per norm."""
    out = tmp_path_factory.mktemp("virtual")
    mp.spawn(_worker, args=(str(out),), nprocs=DEVICES, join=True)
    return {norm: [torch.load(out / f"{norm}_{r}.pt") for r in range(DEVICES)] for norm in NORMS}


@pytest.mark.parametrize("norm", NORMS)
def test_one_process_with_virtual_devices_equals_that_many_processes(norm, processes):
    ranks = processes[norm]
    backbone, head = make_model(norm)
    split_batch_statistics(backbone, DEVICES)
    one = train_steps(backbone, backbone, head, slice(None))
    for step in range(STEPS):
        # step 0 is float64 throughout but for Partial FC's float32 margin maths; later steps start from
        # weights that carry its float32 rounding, amplified by a BatchNorm1d over 2 samples per device
        close = {"rtol": 1e-5, "atol": 1e-6} if step == 0 else {"rtol": 1e-3, "atol": 1e-4}
        for r in range(DEVICES):  # device r holds samples r, r + V, ...
            torch.testing.assert_close(one["embeddings"][step][r::DEVICES], ranks[r]["embeddings"][step],
                                       **close)
        assert one["loss"][step] == pytest.approx(ranks[0]["loss"][step], rel=close["rtol"])
        assert one["grads"][step].keys() == ranks[0]["grads"][step].keys()
        for name, grad in one["grads"][step].items():
            torch.testing.assert_close(grad, ranks[0]["grads"][step][name], **close,
                                       msg=lambda m, where=f"step {step} {name}": f"{where}: {m}")
    assert one["buffers"].keys() == ranks[0]["buffers"].keys()
    for name, buffer in one["buffers"].items():  # device 0's running statistics, as process 0's
        torch.testing.assert_close(buffer, ranks[0]["buffers"][name], rtol=1e-4, atol=1e-5, msg=name)
    if norm != "gn":  # and those differ from another device's: the statistics really are per device
        assert any(not torch.equal(one["buffers"][n], ranks[1]["buffers"][n]) for n in one["buffers"]
                   if "running_mean" in n)


def layer_case(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, traceable: bool = False):
    """Output, input gradient and parameter gradients of ``layer`` on ``x`` with loss sum(y * grad)."""
    x = x.clone().requires_grad_()
    if traceable:  # the plain-autograd path torch.compile and ONNX export take
        params = (layer.weight, layer.bias, layer.mean_weight, layer.var_weight)
        y, _ = layer._forward_traceable(x, params, (layer.running_mean, layer.running_var), layer._options())
    else:
        y = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kind", ["sn", "sn_traceable", "bn"])
def test_a_layer_with_virtual_devices_equals_one_layer_per_device(kind):
    torch.manual_seed(0)
    base = SwitchNorm2d(6, momentum=0.3) if kind.startswith("sn") else nn.BatchNorm2d(6, momentum=0.3)
    base = base.double()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(BATCH, 6, 5, 3, dtype=torch.float64) * 2 + 1
    grad = torch.randn_like(x)
    split = split_batch_statistics(nn.Sequential(copy.deepcopy(base)), DEVICES)[0]
    assert split.virtual_devices == DEVICES
    y, dx, dparams = layer_case(split, x, grad, traceable=kind == "sn_traceable")
    for v in range(DEVICES):
        layer = copy.deepcopy(base)
        yv, dxv, dparams_v = layer_case(layer, x[v::DEVICES], grad[v::DEVICES], kind == "sn_traceable")
        torch.testing.assert_close(y[v::DEVICES], yv)
        torch.testing.assert_close(dx[v::DEVICES], dxv)
        if v == 0 and kind != "sn_traceable":  # running statistics follow device 0
            torch.testing.assert_close(split.running_mean, layer.running_mean)
            torch.testing.assert_close(split.running_var, layer.running_var)
        for name in dparams:
            dparams[name] = dparams[name] - dparams_v[name]  # the sum over devices is the gradient
    for name, rest in dparams.items():
        torch.testing.assert_close(rest, torch.zeros_like(rest), atol=1e-12, rtol=0, msg=name)


def test_one_device_changes_nothing_and_split_layers_keep_the_state_dict():
    backbone = build_backbone("iresnet18", norm="bn", embedding_size=8, input_size=16, width=4)
    modules = list(backbone.modules())
    assert split_batch_statistics(backbone, 1) is backbone and list(backbone.modules()) == modules
    state = copy.deepcopy(backbone.state_dict())
    split_batch_statistics(backbone, 2, embedding=False)
    kinds = {type(m) for m in backbone.modules()}
    assert SplitBatchNorm2d in kinds and nn.BatchNorm2d not in kinds and SplitBatchNorm1d not in kinds
    assert backbone.state_dict().keys() == state.keys()
    plain = build_backbone("iresnet18", norm="bn", embedding_size=8, input_size=16, width=4)
    plain.load_state_dict(backbone.state_dict())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(plain.eval()(x), backbone.eval()(x))  # eval: running statistics only


def test_a_batch_that_does_not_split_is_refused_naming_both_numbers():
    with pytest.raises(ConfigError, match=r"batch_size=10 .*virtual_devices=4"):
        load_config(None, ["train.batch_size=10", "train.virtual_devices=4"])
    layer = split_batch_statistics(nn.Sequential(SwitchNorm2d(3)), 4)[0]
    with pytest.raises(ValueError, match="batch of 6 .*virtual_devices=4"):
        layer(torch.randn(6, 3, 2, 2))


def test_training_with_virtual_devices_down_to_one_image_each(tmp_path):
    """The engine wires train.virtual_devices: per-device statistics change training, and at one image per
    device the embedding BatchNorm1d takes the whole batch (a per-device one would have no statistics)."""
    generate_synthetic(tmp_path / "data", identities=4, images_per_identity=4, size=32, seed=0,
                       verify_identities=20, verify_pairs=20, workers=1, progress=False)
    base = ["model.name=iresnet18", "model.width=4", "model.embedding_size=8", "model.input_size=32",
            f"data.train={tmp_path / 'data'}", "data.num_workers=0", "data.flip=false", "train.batch_size=4",
            "train.max_steps=2", "train.progress=false", "train.device=cpu", "train.grad_clip=null"]
    states = {}
    for norm, devices in (("bn", 1), ("bn", 2), ("bn", 4), ("sn", 4)):
        out = tmp_path / f"{norm}{devices}"
        extra = ["model.norm_kwargs={using_bn: false}"] if norm == "sn" else []
        with redirect_stdout(io.StringIO()):
            train(load_config(None, base + extra + [f"model.norm={norm}", f"train.virtual_devices={devices}",
                                                   f"train.output_dir={out}"]))
        states[norm, devices] = load_checkpoint(out / "checkpoints" / "step_2.pt")["backbone"]
    assert states["bn", 1].keys() == states["bn", 2].keys()
    assert not torch.equal(states["bn", 1]["bn1.running_mean"], states["bn", 2]["bn1.running_mean"])
    assert all(torch.isfinite(t).all() for s in states.values() for t in s.values() if t.is_floating_point())
