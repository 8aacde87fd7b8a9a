"""A teacher behind a server (vLLM ``prompt_logprobs``): the client, and training against it.

A stand-in server on 127.0.0.1 answers like vLLM's completions endpoint (top-K entries per prompt
position plus the prompt token itself, entry 0 null), computed by a tiny local teacher model.
"""
from __future__ import annotations

import http.server
import json
import threading

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastkd import demo_assets as da  # noqa: E402
from fastkd.train import TrainConfig, Trainer  # noqa: E402
from fastkd.train.server import ServerTeacher  # noqa: E402

K = 16


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests += 1
        if self.server.status != 200:
            self._reply(self.server.status, {"error": "stand-in failure"})
            return
        k = body["prompt_logprobs"]
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            with torch.no_grad():
                logprobs = torch.log_softmax(self.server.model(torch.tensor([prompt])).logits[0].double(), -1)
            entries = [None]
            for t in range(1, len(prompt)):
                top = logprobs[t - 1].topk(k)
                entry = {str(int(j)): {"logprob": float(v), "rank": r + 1}
                         for r, (v, j) in enumerate(zip(top.values, top.indices))}
                entry.setdefault(str(prompt[t]), {"logprob": float(logprobs[t - 1, prompt[t]]), "rank": 999})
                entries.append(entry)
            choices.append({"index": index, "text": "", "prompt_logprobs": entries})
        self._reply(200, {"choices": choices[::-1]})  # any order: the client sorts by index

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("server_assets")
    setup = da.build_demo_setup(root, n_teacher=200, n_student=32, n_heldout=8)
    tok = AutoTokenizer.from_pretrained(setup.teacher_tokenizer)
    teacher_dir = da.build_model(root / "teacher", len(tok), hidden=48, layers=2, seed=1)
    tok.save_pretrained(teacher_dir)
    student_dir = da.build_model(root / "student", len(tok), hidden=32, layers=2, seed=2)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    server.status, server.requests = 200, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield dict(server=server, url=f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
               teacher=str(teacher_dir), student=str(student_dir), tokenizer=str(setup.teacher_tokenizer),
               data=str(setup.student_data), heldout=str(setup.heldout_data), tok=tok)
    server.shutdown()
    torch.set_num_threads(threads)


def config(a, tmp_path, **values) -> TrainConfig:
    base = dict(mode="online", student=a["student"], tokenizer=a["tokenizer"], data=a["data"], eval_data=a["heldout"],
                output_dir=str(tmp_path), max_steps=4, batch_size=4, lr=3e-3, lr_schedule="constant", impl="torch",
                progress=False, tensorboard=False, save_final=False)
    base.update(values)
    return TrainConfig(**base)


def test_client_returns_the_models_top_k(assets):
    texts = ["Zoë has 3 🍎 and gets 4 more.", "7 + 8 = 15"]
    rows = [assets["tok"](t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.int64)
    mask = torch.zeros(2, width, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    vocab = len(assets["tok"])
    top_ids, top_lp = ServerTeacher(assets["url"], "teacher", K, vocab).topk_logprobs(ids, mask)
    assert top_ids.shape == top_lp.shape == (2, width, K)
    for b, r in enumerate(rows):
        with torch.no_grad():
            reference = torch.log_softmax(assets["server"].model(torch.tensor([r])).logits[0].double(), -1)
        top = reference.topk(K)
        n = len(r) - 1  # rows 0..n-1 predict tokens 1..n; the last row and the padding are unused
        torch.testing.assert_close(top_lp[b, :n].double(), top.values[:n], rtol=0, atol=1e-6)
        assert torch.equal(top_ids[b, :n], top.indices[:n])
        assert (top_ids[b, n:] == -1).all() and (top_lp[b, n:] == 0).all()


def test_training_against_the_server_equals_the_in_process_teacher(assets, tmp_path):
    served = Trainer(config(assets, tmp_path / "served", teacher_url=assets["url"], server_topk=K))
    served.train()
    local = Trainer(config(assets, tmp_path / "local", teacher=assets["teacher"], topk=K, topk_from="teacher"))
    local.train()
    for a, b in zip(served.history, local.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # same top-k and tail bucket, τ = 1
    eval_lines = [json.loads(line) for line in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_kl_topk" in line and line["eval_kl_topk"] > 0 for line in eval_lines)


def test_on_policy_rollouts_scored_by_the_server(assets, tmp_path):
    before = assets["server"].requests
    trainer = Trainer(config(assets, tmp_path, mode="on_policy", teacher_url=assets["url"], server_topk=K, lmbda=1.0,
                             prompt_tokens=3, max_new_tokens=5, eval_data=None))
    trainer.train()
    assert all(r["rollout_batches"] == 1 and r["loss"] == r["loss"] for r in trainer.history)
    assert assets["server"].requests - before == 4  # one scoring request per step


def test_server_failures_are_clear(assets):
    ids, mask = torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.int64)
    vocab = len(assets["tok"])
    assets["server"].status = 500
    try:
        with pytest.raises(RuntimeError, match=r"no answer from .* after 2 attempts .*HTTP 500"):
            ServerTeacher(assets["url"], None, K, vocab, retries=2).topk_logprobs(ids, mask)
        assets["server"].status = 400
        with pytest.raises(ValueError, match="refused the request"):
            ServerTeacher(assets["url"], None, K, vocab).topk_logprobs(ids, mask)
    finally:
        assets["server"].status = 200
    with pytest.raises(ValueError, match="outside"):
        ServerTeacher(assets["url"], None, K, vocab_size=3).topk_logprobs(ids, mask)
    with pytest.raises(ValueError, match="http"):
        ServerTeacher("localhost:1", None, K, vocab)


@pytest.mark.parametrize("values, key", [
    (dict(teacher="t"), "teacher_url"),
    (dict(temperature=2.0), "temperature"),
    (dict(topk=8), "topk"),
    (dict(mode="sft"), "teacher_url"),
    (dict(server_topk=0), "server_topk"),
])
def test_server_config_errors(values, key):
    base = dict(mode="online", student="s", data="d.jsonl", teacher_url="http://127.0.0.1:1/v1/completions")
    base.update(values)
    with pytest.raises(ValueError, match=key):
        TrainConfig(**base)
