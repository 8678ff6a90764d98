"""model.activation_checkpointing: each stage recomputed in backward, with the same loss, gradients and
running statistics as without it; eval and model building from a config unaffected."""
import pytest
import torch

from backbones import build_backbone
from facerec.config import load_config
from facerec.model_io import model_kwargs


def one_step(name, norm, checkpointed):
    """Loss, gradients, buffers after one SGD step, and how often layer2 started its forward."""
    torch.manual_seed(0)
    model = build_backbone(name, norm=norm, embedding_size=16, input_size=32, width=8,
                           activation_checkpointing=checkpointed)
    calls = []
    model.layer2.register_forward_pre_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model(images).square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.detach(), grads, {k: b.clone() for k, b in model.named_buffers()}, len(calls), model


@pytest.mark.parametrize("name,norm", [("iresnet18", "sn"), ("iresnet18", "bn"), ("resnet18", "bn"),
                                       ("preresnet50", "sn")])
def test_same_step_and_running_statistics_with_and_without_checkpointing(name, norm):
    loss, grads, buffers, calls, plain = one_step(name, norm, checkpointed=False)
    loss_c, grads_c, buffers_c, calls_c, checkpointed = one_step(name, norm, checkpointed=True)
    assert (calls, calls_c) == (1, 2)  # layer2 recomputed in backward
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)
    assert buffers_c.keys() == buffers.keys() and any("num_batches_tracked" in k for k in buffers)
    for key in buffers:  # running statistics updated once, not twice by the recomputation
        torch.testing.assert_close(buffers_c[key], buffers[key], rtol=0, atol=0, msg=key)
    plain.eval()
    checkpointed.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(images), plain(images), rtol=0, atol=0)


def test_config_key_reaches_the_backbone_and_builds_for_export():
    config = load_config(None, ["model.name=iresnet18", "model.activation_checkpointing=true"])
    model = build_backbone(**model_kwargs(config))
    assert model.activation_checkpointing is True
    assert load_config(None)["model"]["activation_checkpointing"] is False
    old = {k: v for k, v in config["model"].items() if k != "activation_checkpointing"}
    assert build_backbone(**model_kwargs({"model": old})).activation_checkpointing is False


def _ddp_worker(rank, world, init_file, out_dir):
    """One DDP step of a SyncSN iresnet18 without and with checkpointing (its norms all-reduce also
    while they are recomputed in backward, between DDP's gradient all-reduces)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for checkpointed in (False, True):
            torch.manual_seed(0)
            model = build_backbone("iresnet18", norm="syncsn", embedding_size=16, input_size=32, width=8,
                                   activation_checkpointing=checkpointed)
            ddp = DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=0.01)
            calls = []
            model.layer2.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
            images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
            ddp(images).square().mean().backward()
            results[checkpointed] = ({k: p.grad for k, p in model.named_parameters() if p.grad is not None},
                                     dict(model.named_buffers()), len(calls))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_checkpointing_under_ddp_with_synchronised_norms(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        (grads, buffers, calls), (grads_c, buffers_c, calls_c) = results[False], results[True]
        assert (calls, calls_c) == (1, 2)  # recomputed once, not once per SyncSN layer
        for key in grads:
            torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)
        for key in buffers:
            torch.testing.assert_close(buffers_c[key], buffers[key], rtol=0, atol=0, msg=key)


def test_a_run_resumes_with_checkpointing_switched_on(tmp_path):
    """Checkpointing changes how the backbone trains, not what it computes: resuming may switch it."""
    import contextlib
    import io

    from data import generate_synthetic
    from facerec.train import train

    generate_synthetic(tmp_path / "data", identities=4, images_per_identity=4, size=32, seed=0,
                       verify_identities=20, verify_pairs=20, workers=1, progress=False)
    base = ["model.name=iresnet18", "model.width=4", "model.embedding_size=8", "model.input_size=32",
            f"data.train={tmp_path / 'data'}", "data.num_workers=0", "train.batch_size=4",
            "train.progress=false", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(load_config(None, base + ["train.max_steps=2"]))
        train(load_config(None, base + ["train.max_steps=4", "model.activation_checkpointing=true"]))
    assert "resumed from" in out.getvalue() and "at step 2" in out.getvalue()
    assert (tmp_path / "run" / "checkpoints" / "step_4.pt").is_file()
