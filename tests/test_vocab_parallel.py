"""Vocabulary-parallel losses on gloo: a head sharded over ranks equals the unsharded loss.

Each test spawns 2 (or 4, marked ``multicore``) CPU processes with a gloo group (``file://``
rendezvous in a temporary directory). Every rank builds the same float64 problem from one seed,
computes the single-process loss with the full head (``impl="torch"``, no collective), and the
vocabulary-parallel loss with the head as a DTensor ``Shard(0)`` built from its local rows (the
``torch.chunk`` split: V=13 over 2 ranks is 7 + 6, over 4 ranks 4 + 4 + 4 + 1). It checks loss,
``d hidden`` and its own shard of ``d weight`` / ``d bias`` to ``TOL`` (relative, float64: only
the order of summation differs). The communication test counts the bytes of every c10d collective
with a dispatch mode, independently of fastkd's own code.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd.config import config
from fastkd.parallel import is_vocab_sharded
from procs import spawn

TOL = 1e-10
N, D, V, K = 7, 5, 13, 3  # 7 rows with one ignored, D odd, V prime: never divisible by the world
DEFAULT_V = V

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")


# ------------------------------------------------------------------------------------------------
# process harness
# ------------------------------------------------------------------------------------------------

def _spawn(scenarios: str, world: int, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(_worker, (scenarios, world, str(tmp_path / "rendezvous")), world)


def _worker(rank, scenarios, world, rendezvous):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        meshes = {}
        for scenario in scenarios.split(","):
            # "name", "name:V" (another vocabulary size) or "name@2x2" (another mesh shape)
            scenario, _, shape = scenario.partition("@")
            name, _, vocab = scenario.partition(":")
            shape = tuple(int(n) for n in shape.split("x")) if shape else (world,)
            if shape not in meshes:
                meshes[shape] = init_device_mesh("cpu", shape)
            globals()["V"] = int(vocab) if vocab else DEFAULT_V  # this process only
            SCENARIOS[name](meshes[shape])
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def _sharded(full: torch.Tensor, mesh, requires_grad=True):
    """``full`` as a DTensor sharded on dim 0 over the last mesh dimension (replicated over any
    other), built from this rank's rows; returns ``(dtensor, local leaf, rows)``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    world = mesh.size(mesh.ndim - 1)
    rank = mesh.get_local_rank(mesh.ndim - 1)
    step = -(-full.shape[0] // world)
    start = min(rank * step, full.shape[0])
    rows = slice(start, min(full.shape[0], start + step))
    local = full.detach()[rows].clone().requires_grad_(requires_grad)
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
    tensor = DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape,
                                stride=full.stride())
    return tensor, local, rows


def _problem(seed, *, bias=False, ragged=False, ignored=True, ids_on_one_shard=False, world=2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    teacher_hidden = torch.randn(N, D + 1, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(V, D + 1, generator=gen, dtype=torch.float64)
    teacher_lp = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=torch.float64) * 2, dim=-1)
    step = -(-V // world)
    if ids_on_one_shard:  # every id of S on the first shard
        pool = torch.arange(0, step)
        ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(N)])
    else:  # the teacher's top-k, and row 0 spread over every shard
        ids = teacher_lp.topk(K, dim=-1).indices
        ids[0] = torch.tensor([0, step, V - 1])[:K]
    logprobs = teacher_lp.gather(1, ids)
    if ragged:
        drop = torch.rand(N, K, generator=gen) < 0.3
        ids, logprobs = torch.where(drop, -1, ids), torch.where(drop, 0.0, logprobs)
    labels = torch.randint(0, V, (N,), generator=gen)
    if ignored:
        labels[3] = -100
    return dict(hidden=hidden, weight=weight, bias=b, teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight, ids=ids, logprobs=logprobs, labels=labels)


def _close(out, ref, what):
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    denom = ref.norm().item()
    err = (out - ref).norm().item() / (denom if denom > 0 else 1.0)
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL:.0e} (rank {dist.get_rank()})"


def _compare(loss_fn, p, mesh, what):
    """Runs ``loss_fn(hidden, weight, bias)`` unsharded and sharded, backpropagates a random
    ``grad_output`` of the loss's shape, and compares loss and gradients (finite entries)."""

    def run(weight, bias):
        hidden = p["hidden"].clone().requires_grad_()
        loss = loss_fn(hidden, weight, bias)
        finite = torch.where(torch.isfinite(loss), loss, 0.0)  # byte log-probs: -inf empty buckets
        gen = torch.Generator().manual_seed(7)
        grad_out = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
        (finite * grad_out).sum().backward()
        return loss, hidden.grad

    weight = p["weight"].clone().requires_grad_()
    bias = None if p["bias"] is None else p["bias"].clone().requires_grad_()
    ref_loss, ref_dh = run(weight, bias)
    s_weight, w_local, rows = _sharded(p["weight"], mesh)
    s_bias, b_local = (None, None) if p["bias"] is None else _sharded(p["bias"], mesh)[:2]
    loss, dh = run(s_weight, s_bias)
    assert not is_vocab_sharded(loss), "the loss is a plain tensor on every rank"
    assert torch.equal(torch.isfinite(loss), torch.isfinite(ref_loss)), f"{what}: -inf entries differ"
    finite = torch.isfinite(ref_loss)
    _close(loss[finite], ref_loss[finite], f"{what}: loss")
    _close(dh, ref_dh, f"{what}: d hidden")
    _close(w_local.grad, weight.grad[rows], f"{what}: d weight shard")
    if bias is not None:
        _close(b_local.grad, bias.grad[rows], f"{what}: d bias shard")
    if loss.shape == (N,):  # reduction="none": ignored rows have loss and gradient exactly 0
        ignored = p["labels"] == -100
        assert (loss[ignored] == 0).all() and (dh[ignored] == 0).all(), what


# ------------------------------------------------------------------------------------------------
# scenarios (run in every spawned rank)
# ------------------------------------------------------------------------------------------------

def _topk_sweep(mesh):
    world = mesh.size(mesh.ndim - 1)
    grid = itertools.product(("forward_kl", "reverse_kl", "jsd"), ("bucket", "renormalize"),
                             (1.0, 1.7), (None, 4.0))
    for case, (divergence, tail, temperature, softcap) in enumerate(grid):
        # the other options vary with the case so every one meets every divergence and tail
        ce_weight = (0.0, 0.3)[case % 2]
        reduction = ("mean", "sum", "none")[case % 3]
        p = _problem(case, bias=case % 4 < 2, ragged=case % 5 == 1, ids_on_one_shard=case % 3 == 2,
                     world=world)

        def loss_fn(hidden, weight, bias):
            return fastkd.topk_kd_loss(
                hidden, weight, p["ids"], p["logprobs"], divergence=divergence, beta=0.3, tail=tail,
                temperature=temperature, softcap=softcap, bias=bias, labels=p["labels"],
                ce_weight=ce_weight, reduction=reduction, impl="torch")

        _compare(loss_fn, p, mesh, f"topk {divergence}/{tail}/τ={temperature}/cap={softcap}")


def _kd_sweep(mesh):
    world = mesh.size(mesh.ndim - 1)
    grid = itertools.product(("forward_kl", "reverse_kl", "jsd"),
                             (None, "teacher", "student", "union"), ("bucket", "renormalize"),
                             (1.0, 1.3), (None, 4.0))
    for case, (divergence, topk_from, tail, temperature, softcap) in enumerate(grid):
        if topk_from is None and tail == "renormalize":
            continue  # the full vocabulary has no tail
        reduction = ("mean", "none", "sum")[case % 3]
        ce_weight = (0.2, 0.0)[(case // 3) % 2]
        p = _problem(100 + case, bias=case % 3 == 0, world=world)
        sharded_teacher = case % 2 == 0  # the teacher's head sharded too, or plain and sliced
        t_weight = _sharded(p["teacher_weight"], mesh, requires_grad=False)[0] if sharded_teacher \
            else p["teacher_weight"]

        def loss_fn(hidden, weight, bias, t_weight=t_weight):
            teacher_weight = t_weight if is_vocab_sharded(weight) else p["teacher_weight"]
            return fastkd.kd_loss(
                hidden, weight, p["teacher_hidden"], teacher_weight, divergence=divergence, beta=0.6,
                topk=None if topk_from is None else K, topk_from=topk_from or "teacher", tail=tail,
                temperature=temperature, softcap=softcap, teacher_softcap=3.0, bias=bias,
                labels=p["labels"], ce_weight=ce_weight, reduction=reduction, impl="torch")

        _compare(loss_fn, p, mesh, f"kd {divergence}/{topk_from}/{tail}")


def _stats(mesh):
    world = mesh.size(mesh.ndim - 1)
    p = _problem(5, bias=True, world=world)
    s_weight = _sharded(p["weight"], mesh)[0]
    s_bias = _sharded(p["bias"], mesh)[0]
    args = dict(labels=p["labels"], temperature=1.4, softcap=3.0, return_stats=True, impl="torch")
    ref = fastkd.topk_kd_loss(p["hidden"], p["weight"], p["ids"], p["logprobs"], bias=p["bias"], **args)[1]
    out = fastkd.topk_kd_loss(p["hidden"], s_weight, p["ids"], p["logprobs"], bias=s_bias, **args)[1]
    for field in ("kd", "entropy", "lse", "topk_mass"):
        _close(getattr(out, field), getattr(ref, field), f"topk stats {field}")
    # hidden as a DTensor replicated over the mesh (what a tensor-parallel model may hand over)
    from torch.distributed.tensor import DTensor, Replicate
    local = p["hidden"].clone().requires_grad_()
    replicated = DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)
    loss = fastkd.topk_kd_loss(replicated, s_weight, p["ids"], p["logprobs"], bias=s_bias, **args)[0]
    loss.backward()
    hidden = p["hidden"].clone().requires_grad_()
    ref_loss = fastkd.topk_kd_loss(hidden, p["weight"], p["ids"], p["logprobs"], bias=p["bias"], **args)[0]
    ref_loss.backward()
    _close(loss, ref_loss, "loss with a replicated DTensor hidden")
    _close(local.grad, hidden.grad, "d hidden of a replicated DTensor hidden")
    for topk in (None, K):
        kw = dict(args, topk=topk, topk_from="union")
        ref = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], **kw)[1]
        out = fastkd.kd_loss(p["hidden"], s_weight, p["teacher_hidden"], p["teacher_weight"], **kw)[1]
        for field in ("kd", "entropy", "lse") + (("topk_mass",) if topk else ()):
            _close(getattr(out, field), getattr(ref, field), f"kd stats topk={topk} {field}")


def _bytes(mesh):
    from fastkd import ByteVocab
    world = mesh.size(mesh.ndim - 1)
    # 13 tokens: several share a first byte, one is a special (bucket 256)
    tokens = [b"a", b"ab", b"b", b"ba", b"c", b"\xc3\xa9", b"\xc3", b"d", b"", b"da", b"e", b"aa", b"cd"]
    vocab = ByteVocab.from_bytes(tokens[:V])
    p = _problem(9, bias=True, world=world)
    _compare(lambda h, w, b: fastkd.byte_logprobs(h, w, vocab, temperature=1.3, softcap=4.0, bias=b,
                                                  impl="torch"),
             p, mesh, "byte_logprobs")
    teacher_lp = torch.log_softmax(torch.randn(N, 257, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(3)), dim=-1)
    teacher_tokens = -torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) - 0.1
    pairs = torch.tensor([[0, 0], [2, 1], [3, 3], [5, 4], [6, 6]])
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        _compare(lambda h, w, b: fastkd.byte_kd_loss(
            h, w, vocab, pairs, teacher_byte_logprobs=teacher_lp,
            teacher_token_logprobs=teacher_tokens, divergence=divergence, beta=0.4,
            temperature=1.2, labels=p["labels"], ce_weight=0.3, chunk_weight=0.5, softcap=5.0,
            bias=b, reduction="none", impl="torch"),
            p, mesh, f"byte_kd_loss {divergence}")


def _bytes_online_teacher(mesh):
    from fastkd import ByteVocab
    world = mesh.size(mesh.ndim - 1)
    tokens = [b"a", b"ab", b"b", b"ba", b"c", b"\xc3\xa9", b"\xc3", b"d", b"", b"da", b"e", b"aa", b"cd"]
    vocab = ByteVocab.from_bytes(tokens[:V])
    teacher_vocab = ByteVocab.from_bytes(tokens[:V][::-1])
    p = _problem(11, world=world)
    s_teacher = _sharded(p["teacher_weight"], mesh, requires_grad=False)[0]
    pairs = torch.tensor([[0, 1], [1, 2], [4, 3], [6, 6]])
    teacher_labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    # what an offline byte cache stores, from a sharded teacher head
    ref = fastkd.bytes.byte_targets(p["teacher_hidden"], p["teacher_weight"], teacher_vocab, teacher_labels,
                                    temperature=1.5, softcap=3.0, impl="torch")
    out = fastkd.bytes.byte_targets(p["teacher_hidden"], s_teacher, teacher_vocab, teacher_labels,
                                    temperature=1.5, softcap=3.0, impl="torch")
    finite = torch.isfinite(ref[0])
    assert torch.equal(torch.isfinite(out[0]), finite), "byte_targets: -inf buckets differ"
    _close(out[0][finite], ref[0][finite], "byte_targets byte log-probs")
    _close(out[1], ref[1], "byte_targets token log-probs")
    for divergence in ("reverse_kl", "jsd"):
        def loss_fn(h, w, b, divergence=divergence):
            teacher_weight = s_teacher if is_vocab_sharded(w) else p["teacher_weight"]
            return fastkd.byte_kd_loss(
                h, w, vocab, pairs, teacher_hidden=p["teacher_hidden"], teacher_weight=teacher_weight,
                teacher_byte_vocab=teacher_vocab, teacher_labels=teacher_labels, labels=p["labels"],
                divergence=divergence, chunk_weight=0.7, temperature=1.5, reduction="mean", impl="torch")

        _compare(loss_fn, p, mesh, f"byte_kd_loss online teacher {divergence}")


class _CountCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, per collective, the bytes this rank passes in (all-reduce payload, all-gather
    input) for every c10d / functional-collective op, whoever calls it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in name:
            if "allreduce" in name:
                tensors = args[0]
            elif "allgather_base" in name or "all_gather_into_tensor" in name:
                tensors = [args[1] if "allgather_base" in name else args[0]]
            else:  # anything else: every tensor it touches
                tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                           if isinstance(a, torch.Tensor)]
            if isinstance(tensors, torch.Tensor):
                tensors = [tensors]
            self.calls.append((name, sum(t.numel() * t.element_size() for t in tensors)))
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(b for _, b in self.calls)


def _communication(mesh):
    """Bytes per call as docs/parallel.md states them; far below one rank's logits."""
    rows, dim, vocab, k, f64 = 16, 8, 4001, 4, 8
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, dtype=torch.float64, generator=gen).requires_grad_()
    full = torch.randn(vocab, dim, dtype=torch.float64, generator=gen)
    t_hidden = torch.randn(rows, dim, dtype=torch.float64, generator=gen)
    t_full = torch.randn(vocab, dim, dtype=torch.float64, generator=gen)
    teacher = torch.log_softmax(torch.randn(rows, vocab, dtype=torch.float64, generator=gen), -1)
    ids = teacher.topk(k, dim=-1).indices
    logprobs = teacher.gather(1, ids)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    weight = _sharded(full, mesh)[0]
    t_weight = _sharded(t_full, mesh, requires_grad=False)[0]
    logits_bytes = rows * -(-vocab // mesh.size(mesh.ndim - 1)) * f64  # one rank's logits
    backward = rows * dim * f64  # the all-reduce of d hidden
    cases = {
        # name: (loss, bytes: forward MAX + forward SUM (+ gathers) + backward)
        "topk bucket": (lambda: fastkd.topk_kd_loss(hidden, weight, ids, logprobs),
                        rows * 2 * f64 + rows * (2 + k) * f64 + backward),
        "topk bucket + CE + stats": (
            lambda: fastkd.topk_kd_loss(hidden, weight, ids, logprobs, labels=labels, ce_weight=0.5,
                                        return_stats=True)[0],
            rows * 3 * f64 + rows * (3 + k + 1 + 1) * f64 + backward),
        "topk renormalize": (lambda: fastkd.topk_kd_loss(hidden, weight, ids, logprobs, tail="renormalize"),
                             rows * k * f64 + backward),
        "dense": (lambda: fastkd.kd_loss(hidden, weight, t_hidden, t_weight),
                  rows * 2 * f64 + rows * 2 * f64 + rows * 2 * f64 + backward),
        "dense + CE": (lambda: fastkd.kd_loss(hidden, weight, t_hidden, t_weight, labels=labels,
                                              ce_weight=0.5),
                       rows * 3 * f64 + rows * 4 * f64 + rows * 2 * f64 + backward),
        "online top-k from the union": (
            lambda: fastkd.kd_loss(hidden, weight, t_hidden, t_weight, topk=k, topk_from="union"),
            2 * (2 * rows * k * f64) + rows * 4 * f64 + rows * (4 + 2 * 2 * k) * f64 + backward),
        "byte log-probs": (lambda: fastkd.byte_logprobs(hidden, weight, _byte_vocab(vocab))[:, :3],
                           rows * 257 * f64 * 2 + backward),
    }
    config.check_values = False
    try:
        for name, (loss_fn, expected) in cases.items():
            counter = _CountCollectives()
            with counter:
                loss = loss_fn()
                loss.sum().backward()
            assert counter.total == expected, f"{name}: {counter.total} bytes, expected {expected}: {counter.calls}"
            assert counter.total < logits_bytes / 3, f"{name}: {counter.total} bytes, logits {logits_bytes}"
    finally:
        config.check_values = True
    counter = _CountCollectives()  # value checks add one fingerprint all-reduce: 32 bytes a tensor
    with counter:
        fastkd.topk_kd_loss(hidden, weight, ids, logprobs, labels=labels).backward()
    assert counter.total == rows * 2 * f64 + rows * (2 + k) * f64 + backward + 32 * 4, counter.calls


def _byte_vocab(vocab):
    from fastkd import ByteVocab
    return ByteVocab.from_bytes([bytes([i % 256]) * (1 + i // 256) if i % 97 else b"" for i in range(vocab)])


def _errors(mesh):
    from torch.distributed.tensor import DTensor, Shard

    p = _problem(1)
    weight, _, _ = _sharded(p["weight"], mesh)
    rank = dist.get_rank()
    # FSDP2-style: a head sharded over ranks that hold different rows
    with pytest.raises(ValueError, match=r"hidden differs across the ranks .* weight.full_tensor\(\)"):
        fastkd.topk_kd_loss(p["hidden"] + rank, weight, p["ids"], p["logprobs"])
    with pytest.raises(ValueError, match=r"teacher_ids differs across the ranks"):
        fastkd.topk_kd_loss(p["hidden"], weight, p["ids"].roll(rank, dims=0), p["logprobs"])
    # sharded over D, not the vocabulary
    by_dim = DTensor.from_local(p["weight"][:, :3] if rank == 0 else p["weight"][:, 3:], mesh,
                                [Shard(1)], run_check=False, shape=p["weight"].shape,
                                stride=p["weight"].stride())
    with pytest.raises(TypeError, match=r"weight is a DTensor with placements .*Shard\(dim=1\)"):
        fastkd.topk_kd_loss(p["hidden"], by_dim, p["ids"], p["logprobs"])
    with pytest.raises(TypeError, match=r"bias must be sharded like weight"):
        fastkd.topk_kd_loss(p["hidden"], weight, p["ids"], p["logprobs"], bias=torch.zeros(V, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"impl='triton': a vocabulary-sharded head"):
        fastkd.topk_kd_loss(p["hidden"], weight, p["ids"], p["logprobs"], impl="triton")
    with pytest.raises(TypeError, match=r"teacher_weight is a vocabulary-sharded DTensor but weight is not"):
        fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"],
                       _sharded(p["teacher_weight"], mesh, requires_grad=False)[0])
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 4\)"):
        fastkd.topk_kd_loss(p["hidden"][:, :4], weight, p["ids"], p["logprobs"])


SCENARIOS = {"topk": _topk_sweep, "kd": _kd_sweep, "stats": _stats, "bytes": _bytes,
             "bytes_online": _bytes_online_teacher, "comm": _communication, "errors": _errors}


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

# Each test spawns its processes once and runs several scenarios in them: starting processes
# that import torch is most of the time on a small machine.

def test_losses_and_stats_sharded_equal_unsharded_2_ranks(tmp_path):
    _spawn("topk,kd,stats", 2, tmp_path)


def test_byte_losses_communication_and_errors_2_ranks(tmp_path):
    _spawn("bytes,bytes_online,comm,errors", 2, tmp_path)


@pytest.mark.multicore
def test_sharded_4_ranks_uneven_with_an_empty_shard_and_a_2x2_mesh(tmp_path):
    # V=13 over 4 ranks: 4 + 4 + 4 + 1 rows; V=9: 3 + 3 + 3 + 0 (a rank without rows); on a
    # 2 x 2 mesh, replicated over dimension 0 and sharded over dimension 1 (V=13: 7 + 6)
    _spawn("topk,kd,bytes,topk:9,kd:9,topk@2x2,kd@2x2", 4, tmp_path)
