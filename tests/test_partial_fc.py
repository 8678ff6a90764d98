"""Partial FC: equality with a plain full classifier (1 and 2 gloo processes), sampling and its optimizer
coupling, world-size independent state dicts."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import ArcFace, CombinedMargin, CosFace, PartialFC
from losses.partial_fc import shard_range

D, C, PER_RANK = 8, 11, 3  # 11 classes: uneven shards [0, 6) and [6, 11) over 2 processes


def problem(seed: int = 0):
    """Full class centres, a global batch (2 x PER_RANK) and labels hitting both shards."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=g)
    embeddings = torch.randn(2 * PER_RANK, D, generator=g) * 3
    labels = torch.tensor([0, 7, 10, 5, 6, 2])
    embeddings[1] = weight[7] * 2  # cosine exactly 1 with its centre
    return weight, embeddings, labels


def full_classifier(weight, embeddings, labels, head):
    """Plain one-process reference: cosine logits of every class, margin, cross-entropy."""
    weight = weight.clone().requires_grad_()
    embeddings = embeddings.clone().requires_grad_()
    cosine = F.normalize(embeddings) @ F.normalize(weight).t()
    loss = F.cross_entropy(head(cosine, labels), labels)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


HEADS = {"arcface": ArcFace(scale=16.0, margin=0.5), "cosface": CosFace(scale=16.0, margin=0.4),
         "combined": CombinedMargin(16.0, 0.9, 0.4, 0.15)}


# ---------------------------------------------------------------------------------------- workers
def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _worker(rank, world, out_dir):
    """Phase 1 (2 processes): loss and grads per head, a sampled SGD step, save the state dict.
    Phase 2 (rank 0 alone, no process group: world size 1): load it, save again.
    Phase 3 (2 processes, a new group): load the world-size-1 checkpoint, gather it again."""
    _init(rank, world, f"{out_dir}/init_1")
    try:
        weight, embeddings, labels = problem()
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for name, head in HEADS.items():
            pfc = PartialFC(D, C, head)
            pfc.load_state_dict({"weight": weight})
            emb = embeddings[local].clone().requires_grad_()
            loss = pfc(emb, labels[local])
            loss.backward()
            results[name] = (loss.detach(), emb.grad, pfc.weight.grad, (pfc.class_start, pfc.class_end))
        # a process group of this rank alone: the whole, unsharded classifier over the local batch
        alone = [dist.new_group([r]) for r in range(world)][rank]
        pfc = PartialFC(D, C, HEADS["arcface"], process_group=alone)
        pfc.load_state_dict({"weight": weight})
        emb = embeddings[local].clone().requires_grad_()
        pfc(emb, labels[local]).backward()
        results["alone"] = (emb.grad, pfc.weight.grad, (pfc.world_size, pfc.class_start, pfc.class_end))
        # sampling across processes: positives of the *global* batch are kept on their shard
        torch.manual_seed(rank)
        pfc = PartialFC(D, 40, ArcFace(), sample_rate=0.25)
        opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        pfc.attach_optimizer(opt)
        batch_labels = torch.tensor([[1, 25, 26], [30, 2, 39]])
        before = pfc.weight.detach().clone()
        emb = torch.randn(3, D, requires_grad=True)
        loss = pfc(emb, batch_labels[rank])
        loss.backward()
        sampled = pfc.sampled_index.clone()
        opt.step()
        changed = torch.nonzero((pfc.weight.detach() != before).any(1)).squeeze(1)
        results["sampled"] = (sampled, changed, (pfc.class_start, pfc.class_end))
        results["sampled_step"] = (before, emb.detach(), loss.detach(), emb.grad)
        state = pfc.state_dict()  # collective
        results["state"] = state["weight"]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(state, f"{out_dir}/world2.pt")
        single = PartialFC(D, 40, ArcFace(), sample_rate=0.25)
        assert single.world_size == 1
        single.load_state_dict(torch.load(f"{out_dir}/world2.pt", weights_only=True))
        torch.save(single.state_dict(), f"{out_dir}/world1.pt")
    _init(rank, world, f"{out_dir}/init_2")  # rendezvous: rank 0 arrives after writing world1.pt
    try:
        pfc = PartialFC(D, 40, ArcFace(), sample_rate=0.25)
        pfc.load_state_dict(torch.load(f"{out_dir}/world1.pt", weights_only=True))
        state = pfc.state_dict()
        torch.save({"shard": pfc.weight.detach(), "range": (pfc.class_start, pfc.class_end),
                    "full": state["weight"]}, f"{out_dir}/load{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(HEADS))
def test_single_process_equals_full_classifier(name):
    weight, embeddings, labels = problem()
    head = HEADS[name]
    pfc = PartialFC(D, C, head)
    pfc.load_state_dict({"weight": weight})
    emb = embeddings.clone().requires_grad_()
    loss = pfc(emb, labels)
    loss.backward()
    ref_loss, ref_emb_grad, ref_weight_grad = full_classifier(weight, embeddings, labels, head)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(emb.grad, ref_emb_grad)
    torch.testing.assert_close(pfc.weight.grad, ref_weight_grad)


def test_two_processes_equal_full_classifier_and_state_dict_round_trip(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    weight, embeddings, labels = problem()
    for name, head in HEADS.items():
        ref_loss, ref_emb_grad, ref_weight_grad = full_classifier(weight, embeddings, labels, head)
        (loss0, emb_grad0, w_grad0, range0) = ranks[0][name]
        (loss1, emb_grad1, w_grad1, range1) = ranks[1][name]
        assert range0 == (0, 6) and range1 == (6, 11)
        torch.testing.assert_close(loss0, ref_loss)
        torch.testing.assert_close(loss1, ref_loss)
        torch.testing.assert_close(torch.cat([emb_grad0, emb_grad1]), ref_emb_grad)
        torch.testing.assert_close(torch.cat([w_grad0, w_grad1]), ref_weight_grad)

    # process_group: a group of one process holds every class and sees only its own batch
    for rank in range(2):
        emb_grad, w_grad, shard = ranks[rank]["alone"]
        assert shard == (1, 0, C)
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        ref = full_classifier(weight, embeddings[local], labels[local], HEADS["arcface"])
        _, ref_emb_grad, ref_w_grad = ref
        torch.testing.assert_close(emb_grad, ref_emb_grad)
        torch.testing.assert_close(w_grad, ref_w_grad)

    # sampling: every global positive of the shard kept, fraction right, only sampled rows stepped
    positives = {0: {1, 2}, 1: {25 - 20, 26 - 20, 30 - 20, 39 - 20}}
    for rank in range(2):
        sampled, changed, (start, end) = ranks[rank]["sampled"]
        assert (start, end) == (20 * rank, 20 * rank + 20)
        assert sampled.numel() == max(int(0.25 * 20), len(positives[rank]))
        assert positives[rank] <= set(sampled.tolist())
        assert set(changed.tolist()) <= set(sampled.tolist())

    # the sampled loss and embedding gradients are those of a full classifier over the sampled rows
    before0, emb0, loss0, emb_grad0 = ranks[0]["sampled_step"]
    before1, emb_grad1 = ranks[1]["sampled_step"][0], ranks[1]["sampled_step"][3]
    rows = torch.cat([ranks[0]["sampled"][0], ranks[1]["sampled"][0] + 20])
    weight = torch.cat([before0, before1])[rows]
    global_labels = torch.searchsorted(rows, torch.tensor([1, 25, 26, 30, 2, 39]))
    ref_loss, ref_emb_grad, _ = full_classifier(
        weight, torch.cat([emb0, ranks[1]["sampled_step"][1]]), global_labels, ArcFace())
    torch.testing.assert_close(loss0, ref_loss)
    torch.testing.assert_close(ranks[1]["sampled_step"][2], ref_loss)
    torch.testing.assert_close(torch.cat([emb_grad0, emb_grad1]), ref_emb_grad)

    # world-size independent state dict: saved by 2 processes, loaded and saved by 1, loaded by 2
    saved2 = torch.load(tmp_path / "world2.pt", weights_only=True)
    assert saved2["weight"].shape == (40, D)
    assert all(torch.equal(ranks[r]["state"], saved2["weight"]) for r in range(2))
    assert torch.equal(torch.load(tmp_path / "world1.pt", weights_only=True)["weight"], saved2["weight"])
    for rank in range(2):
        loaded = torch.load(tmp_path / f"load{rank}.pt", weights_only=True)
        start, end = loaded["range"]
        assert torch.equal(loaded["shard"], saved2["weight"][start:end])
        assert torch.equal(loaded["full"], saved2["weight"])


def _sampled_setup(seed=0, num_classes=50, rate=0.2, optimizer="sgd"):
    torch.manual_seed(seed)
    pfc = PartialFC(D, num_classes, ArcFace(scale=16.0), sample_rate=rate)
    if optimizer == "sgd":
        opt = torch.optim.SGD(pfc.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(pfc.parameters(), lr=0.01, weight_decay=0.1)
    pfc.attach_optimizer(opt)
    return pfc, opt


def _step(pfc, opt, labels):
    opt.zero_grad(set_to_none=True)
    pfc(torch.randn(labels.numel(), D), labels).backward()
    index = pfc.sampled_index.clone()
    opt.step()
    return index


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sampling_steps_only_sampled_rows(optimizer):
    pfc, opt = _sampled_setup(optimizer=optimizer)
    first = _step(pfc, opt, torch.tensor([3, 4, 5, 40]))
    assert {3, 4, 5, 40} <= set(first.tolist()) and first.numel() == 10
    momentum_key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    state = opt.state[pfc.weight]
    assert state[momentum_key].shape == pfc.weight.shape  # full shard shape outside step()
    weight_before = pfc.weight.detach().clone()
    state_before = {k: v.clone() for k, v in state.items()
                    if torch.is_tensor(v) and v.shape == pfc.weight.shape}
    # rows sampled at step 1 (momentum != 0) but not at step 2 must not move at step 2
    for seed in range(20):
        torch.manual_seed(seed)
        second = _step(pfc, opt, torch.tensor([0, 1, 2, 49]))
        if set(first.tolist()) - set(second.tolist()):
            break
        pfc.load_state_dict({"weight": weight_before})  # retry with another sample
    untouched = torch.ones(pfc.num_local, dtype=torch.bool)
    untouched[second] = False
    assert (untouched & torch.isin(torch.arange(pfc.num_local), first)).any()
    assert torch.equal(pfc.weight.detach()[untouched], weight_before[untouched])
    for key, value in state_before.items():
        assert torch.equal(opt.state[pfc.weight][key][untouched], value[untouched]), key
    moved = (pfc.weight.detach() != weight_before).any(1)
    assert moved[second].all()  # sampled rows stepped (gradient, decay and/or momentum)
    assert pfc.weight.grad.shape == pfc.weight.shape


def test_sampled_loss_and_gradients_equal_a_classifier_over_the_sampled_rows():
    pfc, opt = _sampled_setup(rate=0.3)
    weight = pfc.weight.detach().clone()
    embeddings = torch.randn(6, D, requires_grad=True)
    labels = torch.tensor([0, 11, 11, 23, 48, 7])
    loss = pfc(embeddings, labels)
    loss.backward()
    index = pfc.sampled_index
    assert index.numel() == 15 and set(labels.tolist()) <= set(index.tolist())
    sub_labels = torch.searchsorted(index, labels)
    ref_loss, ref_emb_grad, ref_sub_grad = full_classifier(
        weight[index], embeddings.detach(), sub_labels, pfc.head)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(embeddings.grad, ref_emb_grad)
    assert pfc.weight.grad.is_sparse  # only the sampled rows carry a gradient
    grad = pfc.weight.grad.to_dense()
    torch.testing.assert_close(grad[index], ref_sub_grad)
    rest = torch.ones(50, dtype=torch.bool)
    rest[index] = False
    assert torch.all(grad[rest] == 0)


def test_sampling_needs_the_optimizer_and_is_off_in_eval():
    pfc = PartialFC(D, 50, ArcFace(), sample_rate=0.1)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        pfc(torch.randn(2, D), torch.tensor([1, 2]))
    pfc.eval()
    assert torch.isfinite(pfc(torch.randn(2, D), torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="does not hold"):
        pfc.attach_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_loss_is_stable_for_large_logits_and_autocast():
    pfc = PartialFC(D, 1000, CosFace(scale=64.0))
    embeddings = pfc.weight.detach()[:4].clone().requires_grad_()  # cosine 1 with the target
    for context in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        with context:
            loss = pfc(embeddings, torch.tensor([0, 1, 2, 3]))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(embeddings.grad).all() and torch.isfinite(pfc.weight.grad).all()
    wrong = pfc(embeddings.detach(), torch.tensor([4, 5, 6, 7]))  # target far below the best logit
    assert math.isfinite(wrong.item()) and wrong.item() > 20


def test_errors():
    pfc = PartialFC(D, 10, ArcFace())
    with pytest.raises(ValueError, match="10 classes.*12|12 classes.*10"):
        pfc.load_state_dict({"weight": torch.zeros(12, D)})
    with pytest.raises(ValueError, match=r"\(num_classes, 8\)"):
        pfc.load_state_dict({"weight": torch.zeros(10, 4)})
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        pfc(torch.randn(2, D), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="embeddings"):
        pfc(torch.randn(2, D + 1), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels"):
        pfc(torch.randn(2, D), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(D, 10, ArcFace(), sample_rate=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(D, 0, ArcFace())


def test_shard_range_is_balanced_and_contiguous():
    for classes, world in [(11, 2), (10, 3), (7, 7), (100_000, 8)]:
        ranges = [shard_range(classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_sampled_steps_work_with_a_grad_scaler():
    """fp16-style loss scaling: GradScaler unscales the sparse gradient; same weights as unscaled."""

    def train(enabled):
        pfc, opt = _sampled_setup()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(100 + i)
            loss = pfc(torch.randn(4, D), torch.tensor([1, 2, 3, 4 + i]))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return pfc.weight.detach()

    torch.testing.assert_close(train(True), train(False))


def test_bench_heads_quick_runs():
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_heads", "--quick", "--threads", "1"],
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "sample_rate" in result.stdout and "0.10" in result.stdout and "1.00" in result.stdout
