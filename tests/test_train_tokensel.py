"""Token selection (issue #14 item 6; fastkd/train/selection.py): the kept rows are chosen first and
gathered before the LM-head GEMMs; the teacher-entropy criterion needs no student GEMM.

- the scores against float64 references (top-k teacher entropy with the tail spread; an online
  teacher head's entropy);
- in the trainer, for every criterion and both teacher kinds (a top-k cache, an online model): the
  kept rows are a float64 reference's top rows, and loss and gradients equal a float64 loss on
  exactly those rows;
- the LM-head GEMMs (every aten matmul with a vocabulary-sized operand, counted by a dispatch mode)
  see only the kept rows with ``teacher_entropy``: half the tokens, half the loss FLOPs.

Tiny random Llama models on the demo tokenizer, heads scaled so the next-token distributions differ
from row to row (a random head gives near-uniform rows whose entropies all but tie)."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from bench.step import HeadGemms  # noqa: E402
from fastkd import demo_assets as da  # noqa: E402
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference  # noqa: E402
from fastkd.train import TrainConfig, Trainer, selection  # noqa: E402

TEMPERATURE = 2.0  # not 1: the scores and the loss are at τ
FRACTION = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


class Assets:
    pass


def _sharpened(path, scale: float):
    """Multiplies the saved model's LM head by ``scale`` (varied entropies across rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd.cache import capture

    root = tmp_path_factory.mktemp("tokensel_assets")
    setup = da.build_demo_setup(root, n_teacher=40, n_student=16, n_heldout=4)
    a = Assets()
    a.tt = str(setup.teacher_tokenizer)
    tok = AutoTokenizer.from_pretrained(a.tt)
    a.vocab = len(tok)
    a.teacher = _sharpened(da.build_model(root / "teacher", len(tok), hidden=32, layers=1, seed=1), 40.0)
    a.student = _sharpened(da.build_model(root / "student", len(tok), hidden=32, layers=1, seed=2), 20.0)
    for path in (a.teacher, a.student):
        tok.save_pretrained(path)
    a.data = str(setup.student_data)
    a.cache = str(root / "cache")
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher).eval()
    capture(teacher, tok, da.read_texts(setup.student_data), a.cache, topk=8, temperature=TEMPERATURE,
            dtype="fp16")
    return a


def config(a, out, kind: str, **values) -> TrainConfig:
    cfg = dict(mode=kind, student=a.student, tokenizer=a.tt, output_dir=str(out), max_steps=1, batch_size=4,
               lr=1e-3, lr_schedule="constant", impl="torch", progress=False, seed=0, temperature=TEMPERATURE,
               max_grad_norm=None)
    cfg.update(dict(cache=a.cache) if kind == "offline" else dict(teacher=a.teacher, data=a.data))
    cfg.update(values)
    return TrainConfig(**cfg)


def relative_error(x, ref) -> float:
    return float((x.double() - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------------
# the scores
# ----------------------------------------------------------------------------------------------
def spread_entropy_float64(ids, logprobs, vocab):
    """−Σ_S q log q − r log(r / (V − |S|)), r = 1 − Σ_S q, written out in float64 (masses rounded
    above 1 rescaled to 1)."""
    valid = ids >= 0
    q = torch.where(valid, logprobs.double().exp(), 0.0)
    q = q / q.sum(-1, keepdim=True).clamp(min=1.0)
    inside = -torch.where(q > 0, q * q.log(), 0.0).sum(-1)
    r = (1 - q.sum(-1)).clamp(min=0.0)
    return inside - torch.where(r > 0, r * torch.log(r / (vocab - valid.sum(-1))), 0.0)


def test_topk_teacher_entropy_matches_float64():
    gen = torch.Generator().manual_seed(0)
    vocab, k = 203, 7  # odd sizes: no accidental alignment with the K slots
    logits = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 8, 64).double()[:, None]
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    ids, lp = top.indices.clone(), top.values.float()
    ids[::5, -2:] = -1  # ragged rows (a server's shorter lists): those slots hold nothing
    got = selection.topk_teacher_entropy(ids, lp, vocab)
    assert got.dtype == torch.float32 and got.shape == (64,)
    ref = spread_entropy_float64(ids, lp, vocab)
    assert relative_error(got, ref) < 1e-6
    # it is an upper bound of the exact entropy, the one-bucket tail a lower bound
    exact = -(logprobs.exp() * logprobs).sum(-1)
    valid = ids >= 0
    q = torch.where(valid, lp.double().exp(), 0.0)
    bucket = -(q * torch.where(valid, lp.double(), 0.0)).sum(-1) - (1 - q.sum(-1)) * torch.log(1 - q.sum(-1))
    assert (bucket <= exact + 1e-9).all() and (exact <= got.double() + 1e-5).all()
    # exact where the tail is uniform: the ids outside S all share one logit
    flat = logits.clone()
    mask = torch.ones_like(flat, dtype=torch.bool).scatter(1, top.indices, False)
    flat[mask] = -3.0
    flat_lp = flat.log_softmax(-1)
    exact = -(flat_lp.exp() * flat_lp).sum(-1)
    got = selection.topk_teacher_entropy(top.indices, flat_lp.gather(1, top.indices), vocab)  # float64 in
    assert relative_error(got, exact) < 1e-6
    # top-k masses rounded above 1 (tolerated by the loss) still give a finite score
    over = torch.tensor([[math.log(0.6), math.log(0.41)]])
    got = selection.topk_teacher_entropy(torch.tensor([[0, 1]]), over, 10)
    assert relative_error(got, spread_entropy_float64(torch.tensor([[0, 1]]), over, 10)) < 1e-6


def test_head_entropy_matches_float64():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 9, 16, generator=gen), torch.randn(67, 16, generator=gen)
    bias = torch.randn(67, generator=gen)
    head = {"weight": weight, "bias": bias, "softcap": 5.0}
    got = selection.head_entropy(hidden, head, TEMPERATURE, "torch")
    z = 5.0 * torch.tanh((hidden.double() @ weight.double().T + bias.double()) / 5.0) / TEMPERATURE
    lp = z.log_softmax(-1)
    ref = -(lp.exp() * lp).sum(-1).reshape(-1)
    assert got.shape == (18,) and relative_error(got, ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# the trainer: selected rows, loss and gradients
# ----------------------------------------------------------------------------------------------
def reference_scores(trainer, batch, criterion: str):
    """float64 scores of every row from the models' own logits (not hidden_and_head)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        student = trainer.student(**inputs).logits[:, :-1].double() / TEMPERATURE
        if "teacher_ids" in batch:
            ids, lp = batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1]
            if criterion == "teacher_entropy":
                return spread_entropy_float64(ids, lp, student.shape[-1]).reshape(-1)
            if criterion == "divergence":
                _, stats = topk_kd_loss_reference(student * TEMPERATURE, torch.eye(student.shape[-1]).double(), ids,
                                                  lp, labels=labels, temperature=TEMPERATURE, reduction="none",
                                                  return_stats=True)
                return stats.kd
        else:
            teacher = trainer.teacher(**inputs).logits[:, :-1].double() / TEMPERATURE
            if criterion == "teacher_entropy":
                lp = teacher.log_softmax(-1)
                return -(lp.exp() * lp).sum(-1).reshape(-1)
            if criterion == "divergence":
                eye = torch.eye(student.shape[-1]).double()
                _, stats = kd_loss_reference(student * TEMPERATURE, eye, teacher * TEMPERATURE, eye, labels=labels,
                                             temperature=TEMPERATURE, reduction="none", return_stats=True)
                return stats.kd
    lp = student.log_softmax(-1)
    return -(lp.exp() * lp).sum(-1).reshape(-1)


def reference_loss(trainer, batch, index):
    """The float64 summed loss on exactly the rows ``index`` (the student's graph in float32)."""
    from fastkd.integrations import hidden_and_head

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = hidden_and_head(trainer.student, **inputs)
    hidden = s["hidden"][:, :-1].reshape(-1, s["hidden"].shape[-1])[index].double()
    labels = batch["labels"][:, 1:].reshape(-1)[index]
    if "teacher_ids" in batch:
        k = batch["teacher_ids"].shape[-1]
        ids = batch["teacher_ids"][:, :-1].reshape(-1, k)[index]
        lp = batch["teacher_logprobs"][:, :-1].reshape(-1, k)[index]
        return topk_kd_loss_reference(hidden, s["weight"].double(), ids, lp, labels=labels, temperature=TEMPERATURE,
                                      reduction="sum")
    with torch.no_grad():
        t = hidden_and_head(trainer.teacher, **inputs)
    teacher_hidden = t["hidden"][:, :-1].reshape(-1, t["hidden"].shape[-1])[index]
    return kd_loss_reference(hidden, s["weight"].double(), teacher_hidden, t["weight"], labels=labels,
                             temperature=TEMPERATURE, reduction="sum")


def _loss_and_kept_rows(trainer, batch, monkeypatch):
    """The trainer's loss on ``batch`` (backward run), its statistics, the student's gradients
    (then zeroed) and the flat indices of the rows the selection kept (one selection)."""
    chosen = []
    original = selection.top_rows
    monkeypatch.setattr(selection, "top_rows", lambda *args: chosen.append(original(*args)) or chosen[-1])
    loss, stats, _ = trainer._loss_rows(trainer.student, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters()}
    trainer.student.zero_grad(set_to_none=True)
    (index,) = chosen
    return loss, stats, grads, index


@pytest.mark.parametrize("kind", ["offline", "online"])
@pytest.mark.parametrize("criterion", selection.CRITERIA)
def test_kept_rows_loss_and_gradients_match_float64(assets, tmp_path, monkeypatch, kind, criterion):
    trainer = Trainer(config(assets, tmp_path, kind, token_fraction=FRACTION, token_select=criterion))
    batch = trainer._to_device(trainer._next_batch())
    counted = (batch["labels"][:, 1:] != -100).reshape(-1)
    assert (~counted).any()  # padded rows: never kept, and not in the count
    loss, stats, grads, index = _loss_and_kept_rows(trainer, batch, monkeypatch)
    n_kept = math.ceil(FRACTION * int(counted.sum()))
    assert index.numel() == n_kept == int(trainer._kept_rows(batch)) and counted[index].all()
    assert stats.kd.shape == (n_kept,)
    # the kept rows are the reference's top rows (a swap only between scores equal to rounding)
    ref = reference_scores(trainer, batch, criterion).masked_fill(~counted, -math.inf)
    kept = torch.zeros_like(counted)
    kept[index] = True
    lowest_kept, highest_dropped = ref[kept].min(), ref[~kept & counted].max()
    assert lowest_kept >= highest_dropped - 1e-5 * ref[counted].abs().max(), (lowest_kept, highest_dropped)
    expected = set(ref.topk(n_kept).indices.tolist())
    assert len(expected ^ set(index.tolist())) <= 2 * int((ref[counted] - lowest_kept).abs().lt(1e-5).sum())

    ref_loss = reference_loss(trainer, batch, index)
    ref_loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * abs(float(ref_loss.detach()))
    for name, p in trainer.student.named_parameters():
        assert relative_error(grads[name], p.grad.double()) < 1e-4, name


def test_sft_keeps_the_most_uncertain_rows_and_trains_on_them_alone(assets, tmp_path, monkeypatch):
    """sft (CE only) selects by the student's entropy at τ = 1, then the CE of the kept rows."""
    from fastkd.integrations import hidden_and_head

    trainer = Trainer(config(assets, tmp_path, "online", mode="sft", teacher=None, temperature=1.0,
                             token_fraction=FRACTION))
    batch = trainer._to_device(trainer._next_batch())
    counted = (batch["labels"][:, 1:] != -100).reshape(-1)
    loss, _, grads, index = _loss_and_kept_rows(trainer, batch, monkeypatch)
    assert index.numel() == math.ceil(FRACTION * int(counted.sum())) == int(trainer._kept_rows(batch))

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        lp = trainer.student(**inputs).logits[:, :-1].double().log_softmax(-1)
    ref = (-(lp.exp() * lp).sum(-1)).reshape(-1).masked_fill(~counted, -math.inf)
    kept = torch.zeros_like(counted)
    kept[index] = True
    assert ref[kept].min() >= ref[~kept & counted].max() - 1e-5 * ref[counted].abs().max()

    s = hidden_and_head(trainer.student, **inputs)
    hidden = s["hidden"][:, :-1].reshape(-1, s["hidden"].shape[-1])[index].double()
    logits = hidden @ s["weight"].double().T
    ref_loss = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1)[index], reduction="sum")
    ref_loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * float(ref_loss.detach())
    for name, p in trainer.student.named_parameters():
        assert relative_error(grads[name], p.grad.double()) < 1e-4, name
    trainer.student.zero_grad(set_to_none=True)
    # the scoring forward on all rows, then logits, dh and dW of the kept rows
    assert head_rows(trainer, batch)[0] == counted.numel() + 3 * index.numel()


# ----------------------------------------------------------------------------------------------
# the head GEMMs see only the kept rows
# ----------------------------------------------------------------------------------------------
def head_rows(trainer, batch) -> tuple[float, int]:
    """(rows through LM-head GEMMs, summed over the GEMMs of one loss forward + backward; the
    most rows any one of them saw)."""
    vocab = trainer.student.get_output_embeddings().weight.shape[0]
    with HeadGemms(vocab, hidden_sizes=(32,)) as gemms:
        loss, _, _ = trainer._loss_rows(trainer.student, batch)
        loss.backward()
    trainer.student.zero_grad(set_to_none=True)
    return gemms.flops / (2 * 32 * vocab), gemms.most_rows  # both models have D = 32


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_head_gemms_see_only_the_kept_rows(assets, tmp_path, kind):
    trainer = Trainer(config(assets, tmp_path, kind))
    batch = trainer._to_device(trainer._next_batch())
    n_rows = batch["labels"][:, 1:].numel()
    kept = math.ceil(FRACTION * int((batch["labels"][:, 1:] != -100).sum()))
    full, most = head_rows(trainer, batch)
    per_row = 3 if kind == "offline" else 4  # the student's logits, dh and dW (+ the teacher's logits)
    assert full == per_row * n_rows and most == n_rows
    cost = {}
    for criterion in selection.CRITERIA:
        trainer.config.token_fraction, trainer.config.token_select = FRACTION, criterion
        cost[criterion], most = head_rows(trainer, batch)
        if criterion == "teacher_entropy" and kind == "offline":
            assert most == kept  # no GEMM on all rows
    scoring = {"teacher_entropy": 0 if kind == "offline" else 1, "entropy": per_row - 2, "divergence": per_row - 2}
    for criterion, rows in cost.items():  # scoring forward(s) on all rows, then the loss on the kept ones
        assert rows == scoring[criterion] * n_rows + per_row * kept, (criterion, rows)
    if kind == "offline":  # half the tokens, half the loss FLOPs
        assert cost["teacher_entropy"] / full == pytest.approx(kept / n_rows)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    (dict(token_select="teacher"), "token_select must be one of teacher_entropy, entropy, divergence"),
    (dict(mode="sft", token_select="teacher_entropy"), "token_select: mode sft has no teacher"),
    (dict(mode="sft", token_select="divergence"), "token_select: mode sft has no teacher"),
    (dict(token_fraction=1.0), "token_select: token_fraction is 1"),
])
def test_token_select_errors_name_the_key(tmp_path, values, message):
    cfg = dict(mode="online", student="s", teacher="t", data="d", output_dir=str(tmp_path), token_fraction=0.5,
               token_select="entropy")
    cfg.update(values)
    if cfg["mode"] == "sft":
        cfg["teacher"] = None
    with pytest.raises(ValueError, match=message):
        TrainConfig(**cfg).validate()


def test_token_select_defaults():
    online = TrainConfig(mode="online", student="s", teacher="t", data="d", token_fraction=0.5)
    sft = TrainConfig(mode="sft", student="s", data="d", token_fraction=0.5)
    for cfg in (online, sft):
        cfg.validate()
    assert online.resolved_token_select == "teacher_entropy" and sft.resolved_token_select == "entropy"


def test_resume_compares_the_criterion_a_run_used():
    """Runs saved when token_select defaulted to "entropy" resume when no token was selected
    (token_fraction 1); a run that selected with another criterion than this one would is refused."""
    from fastkd.train.trainer import _selection

    old_default = {"mode": "offline", "token_fraction": 1.0, "token_select": "entropy"}
    assert _selection(old_default) is None
    assert _selection({"mode": "offline", "token_fraction": 1.0, "token_select": None}) is None
    assert _selection({"mode": "offline", "token_fraction": 0.5, "token_select": None}) == "teacher_entropy"
    assert _selection({"mode": "sft", "token_fraction": 0.5, "token_select": None}) == "entropy"
    assert _selection({"mode": "offline", "token_fraction": 0.5, "token_select": "entropy"}) == "entropy"
