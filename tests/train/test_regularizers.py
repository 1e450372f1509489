"""The layer stack and the training-only regularizers (train/model.py, train/noise.py, train/averaging.py):
the stack computes what the multi-layer module did and loads its checkpoints; masks are drawn per batch and
held over time where they should be; evaluation sees none of them; --resume is bit-exact with each on."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from support import run_stage
from torch import nn

from train import __main__ as cli
from train import checkpoint
from train.averaging import Average
from train.data import load_corpus
from train.evaluate import evaluate
from train.loop import RunOptions, TrainConfig, train
from train.model import CELLS, CharRNN, ModelConfig, Noise
from train.noise import Masks, Rates
from train.rundir import RunDirError

QUIET = RunOptions(progress="quiet")


def _multi_layer_keys(state: dict) -> dict:
    """What a version 1 or 2 checkpoint named the same weights: one multi-layer module under `rnn.`."""
    return {re.sub(r"^layers\.(\d+)\.(\w+)_l0$", r"rnn.\2_l\1", k): v for k, v in state.items()}


# --- the layer stack ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", sorted(CELLS))
def test_the_stack_computes_what_the_multi_layer_module_did_bit_for_bit(cell):
    """Forward, --dropout's draws and gradients: identical to nn.GRU(num_layers=3, dropout=p) + nn.Dropout, so
    old runs continue exactly (on the CPU; cuDNN's own dropout never was repeatable)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=9, cell=cell, num_layers=3, hidden_size=12, dropout=0.3)
    model = CharRNN(cfg)
    multi = CELLS[cell](cfg.embed_size, 12, num_layers=3, batch_first=True, dropout=0.3)
    old = _multi_layer_keys(model.state_dict())
    multi.load_state_dict({k[len("rnn."):]: v for k, v in old.items() if k.startswith("rnn.")})
    ids, state = torch.randint(0, 9, (4, 7)), torch.randn(4, 3, cfg.state_size)

    torch.manual_seed(5)
    logits, new_state = model(ids, state)
    torch.manual_seed(5)
    layers_first = state.transpose(0, 1)
    if cell == "lstm":
        h, c = layers_first.chunk(2, dim=2)
        y, (h, c) = multi(model.embed(ids), (h.contiguous(), c.contiguous()))
        want_state = torch.cat([h, c], dim=2)
    else:
        y, want_state = multi(model.embed(ids), layers_first.contiguous())
    want = model.head(model.drop(y))
    assert torch.equal(logits, want) and torch.equal(new_state, want_state.transpose(0, 1))
    logits.square().sum().backward()
    want.square().sum().backward()
    for i in range(3):
        assert torch.equal(model.layers[i].weight_hh_l0.grad, multi.get_parameter(f"weight_hh_l{i}").grad)


def test_old_keys_load_and_the_parameter_order_is_unchanged():
    cfg = ModelConfig(vocab_size=9, cell="gru", num_layers=2, hidden_size=12)
    a, b = CharRNN(cfg), CharRNN(cfg)
    old = _multi_layer_keys(a.state_dict())
    assert "rnn.weight_ih_l1" in old and "rnn.bias_hh_l0" in old
    b.load_state_dict(old)  # strict: every key mapped, none left over
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    # an optimizer state is indexed by parameter order: the multi-layer module's order, layer by layer
    assert list(_multi_layer_keys(dict(a.named_parameters()))) == [
        "embed.weight", *(f"rnn.{w}_l{i}" for i in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
        "head.weight", "head.bias"]


def _setup(tiny_corpus, out, cell="gru", **overrides):
    corpus = load_corpus(str(tiny_corpus))
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell=cell, num_layers=2, hidden_size=16)
    # constant: a cosine schedule follows the budget, and these runs stop early by a smaller budget (a signal,
    # which keeps the budget, is test_resume.py's way)
    cfg = TrainConfig(out=out, batch_size=4, seq_len=16, eval_every=5, seed=3, steps=16, schedule="constant",
                      **overrides)
    return corpus, model_cfg, cfg


def _same_run(a, b) -> None:
    """Two run folders hold bit-identical weights, training weights, carried state and validations."""
    for name in (checkpoint.FILENAME, checkpoint.LAST):
        x, y = checkpoint.load(a, name), checkpoint.load(b, name)
        assert x["model_state"].keys() == y["model_state"].keys()
        assert all(torch.equal(x["model_state"][k], y["model_state"][k]) for k in x["model_state"]), name
        assert x["summary"]["best_val_loss"] == y["summary"]["best_val_loss"]
    x, y = checkpoint.load(a, checkpoint.LAST)["resume"], checkpoint.load(b, checkpoint.LAST)["resume"]
    assert torch.equal(x["state"], y["state"])
    assert ("weights" in x) == ("weights" in y)
    if "weights" in x:
        assert all(torch.equal(x["weights"][k], y["weights"][k]) for k in x["weights"])

    def vals(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["val_loss"], r["val_loss_windowed"]) for r in records if r["event"] == "val"]

    assert vals(a) == vals(b)


def test_a_version_2_last_pt_resumes_exactly(tmp_path, tiny_corpus):
    """A last.pt of the multi-layer module (its keys, version 2) continues as the stack's own would."""
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path / "whole")
    train(corpus, model_cfg, cfg, QUIET)
    part = replace(cfg, out=tmp_path / "v2", steps=10)
    train(corpus, model_cfg, part, QUIET)
    for name in (checkpoint.FILENAME, checkpoint.LAST):
        saved = checkpoint.load(part.out, name)
        saved["model_state"] = _multi_layer_keys(saved["model_state"])
        torch.save({**saved, "version": 2}, part.out / name)
    assert checkpoint.load(part.out, checkpoint.LAST)["version"] == 2
    train(corpus, model_cfg, replace(part, steps=16), RunOptions(resume="yes", progress="quiet"))
    _same_run(cfg.out, part.out)


# --- the masks ------------------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=9, cell="lstm", num_layers=3, hidden_size=12, embed_size=10)
ALL = Rates(input=0.3, hidden=0.4, output=0.5, weight_hh=0.5)


def test_masks_differ_per_batch_repeat_per_step_and_split_by_rows():
    masks = Masks(ALL, CFG, batch=6, rows=slice(0, 6), seed=1, device=torch.device("cpu"))
    a, b, again = masks.at(0), masks.at(1), masks.at(0)
    assert a is not None and b is not None and again is not None
    assert a.input is not None and a.output is not None and b.input is not None
    assert a.input.shape == (6, 1, 10) and a.output.shape == (6, 1, 12)  # [batch, 1, features]: held over time
    assert [m.shape for m in a.hidden] == [(6, 1, 12)] * 2 and [m.shape for m in a.weight_hh] == [(48, 12)] * 3
    assert not torch.equal(a.input, b.input) and not torch.equal(a.weight_hh[0], b.weight_hh[0])
    assert not torch.equal(a.input[0], a.input[1])  # one mask per sequence, not one per batch
    assert all(torch.equal(x, y) for x, y in zip(_flat(a), _flat(again), strict=True))  # (seed, step) decides
    assert torch.equal(a.input.unique(), torch.tensor([0.0, 1 / 0.7]))  # inverted: the kept scale by 1 / (1 - p)
    # a DDP rank draws the global batch and keeps its rows; the weight mask is every rank's
    rank = Masks(ALL, CFG, batch=6, rows=slice(3, 6), seed=1, device=torch.device("cpu")).at(0)
    assert rank is not None and rank.input is not None
    assert torch.equal(rank.input, a.input[3:6]) and torch.equal(rank.weight_hh[2], a.weight_hh[2])
    assert Masks(Rates(), CFG, 6, slice(0, 6), 1, torch.device("cpu")).at(0) is None


def _flat(noise: Noise) -> list[torch.Tensor]:
    return [t for t in (noise.input, *noise.hidden, noise.output, *noise.weight_hh) if t is not None]


def test_locked_masks_are_constant_over_time_inside_the_model():
    torch.manual_seed(0)
    model = CharRNN(CFG)
    noise = Masks(Rates(input=0.5, hidden=0.5), CFG, 4, slice(0, 4), 7, torch.device("cpu")).at(3)
    seen = {}
    for i in (0, 1):
        model.layers[i].register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0]))
    model(torch.randint(0, 9, (4, 20)), model.init_state(4), noise)
    for x in seen.values():  # [B, T, F]; zeros where the mask dropped: the same features at every time step
        dropped = x == 0
        assert dropped.any() and torch.equal(dropped, dropped[:, :1].expand_as(dropped))
        assert not torch.equal(dropped[0, 0], dropped[1, 0])  # and another sequence drops others


def test_weight_drop_masks_the_recurrent_matrix_and_leaves_the_weights_plain():
    torch.manual_seed(0)
    model = CharRNN(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise = Masks(Rates(weight_hh=0.5), CFG, 4, slice(0, 4), 7, torch.device("cpu")).at(0)
    assert noise is not None
    ids, state = torch.randint(0, 9, (4, 6)), torch.randn(4, 3, CFG.state_size)
    logits, _ = model(ids, state, noise)
    by_hand = CharRNN(CFG)
    by_hand.load_state_dict(before)
    with torch.no_grad():
        for layer, mask in zip(by_hand.layers, noise.weight_hh, strict=True):
            layer.weight_hh_l0.mul_(mask)
    assert torch.equal(logits, by_hand(ids, state)[0])  # the fused kernel on masked weights
    logits.sum().backward()
    grad, mask = model.layers[1].weight_hh_l0.grad, noise.weight_hh[1]
    assert grad is not None and grad.abs().sum() > 0 and not grad[mask == 0].any()  # dropped: no gradient
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # what export reads: plain


def test_forget_bias():
    model = CharRNN(ModelConfig(vocab_size=9, cell="lstm", num_layers=2, hidden_size=12))
    model.set_forget_bias(1.0)
    for layer in model.layers:
        assert (layer.bias_ih_l0[12:24] == 1.0).all() and (layer.bias_hh_l0[12:24] == 0.0).all()
        assert (layer.bias_ih_l0[:12] != 1.0).all()  # the other gates keep their init
    with pytest.raises(ValueError, match="LSTM only"):
        CharRNN(ModelConfig(vocab_size=9, cell="gru")).set_forget_bias(1.0)


def test_forget_bias_is_refused_for_a_gru_run(tmp_path, tiny_corpus):
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--cell", "gru", "--forget-bias", "1", "--steps", "1",
                     "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--forget-bias sets the LSTM forget gate; --cell gru has none" in proc.stderr


def test_the_average_follows_the_weights_with_a_ramped_decay():
    torch.manual_seed(0)
    model = CharRNN(CFG)
    avg = Average(model, 0.9)
    start = [p.detach().clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model, 0)  # decay min(0.9, 1 / 10) = 0.1: the first update takes 0.9 of the new weights
    for a, s, p in zip(avg.model.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(a, 0.1 * s + 0.9 * p)
    assert avg.decay_at(1000) == 0.9 and not any(p.requires_grad for p in avg.model.parameters())


# --- in training --------------------------------------------------------------------------------------

OPTIONS = {
    "dropout": ({}, {"dropout": 0.3}),  # today's --dropout, global RNG: resumes through the saved RNG states
    "weight-drop": ({"weight_drop": 0.5}, {}),
    "locked": ({"locked_input": 0.2, "locked_hidden": 0.3, "locked_output": 0.4}, {}),
    "ema": ({"ema": 0.9}, {}),
    "lstm-forget-bias": ({"forget_bias": 1.0}, {"cell": "lstm"}),
    "all": ({"weight_drop": 0.3, "locked_input": 0.1, "locked_hidden": 0.2, "locked_output": 0.3, "ema": 0.95,
             "forget_bias": 1.0}, {"cell": "lstm", "dropout": 0.1}),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_resume_is_bit_exact_with_each_option(tmp_path, tiny_corpus, name):
    train_opts, model_opts = OPTIONS[name]
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path / "whole", **train_opts)
    model_cfg = replace(model_cfg, **model_opts)
    whole = train(corpus, model_cfg, cfg, QUIET)
    assert whole["chars_per_second"] > 0
    # stops mid-epoch at a validation step (a budget that ends elsewhere validates there, which the whole
    # run does not, and may then keep another checkpoint.pt)
    part = replace(cfg, out=tmp_path / "part", steps=10)
    train(corpus, model_cfg, part, QUIET)
    train(corpus, model_cfg, replace(part, steps=16), RunOptions(resume="yes", progress="quiet"))
    _same_run(cfg.out, part.out)


# --- --ema 0.99 as the text preset's default ------------------------------------------------------------

@pytest.mark.parametrize("argv, ema, unset", [
    ([], 0.99, {"ema"}),                              # the text preset: on
    (["--corpus", "hihell"], 0.0, {"ema"}),           # the seed lesson keeps its plain weights
    (["--ema", "0"], 0.0, set()),                     # off, said on the command line
    (["--ema", "0.995"], 0.995, set()),
])
def test_ema_is_the_text_default(argv, ema, unset):
    args = cli.parser().parse_args(["--out", "runs/x", *argv])
    assert cli.configs(args, vocab_size=10)[1].ema == ema
    assert cli.run_options(args).unset == unset


def test_a_run_begun_before_ema_was_the_default_resumes_as_it_was_trained(tmp_path, tiny_corpus):
    """last.pt at ema 0.0 (the old default) and --ema left unset: the run keeps 0.0 and ends bit for bit as
    the uninterrupted run; --ema 0.99 said on the command line is refused, naming the difference."""
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path / "whole", ema=0.0)
    train(corpus, model_cfg, cfg, QUIET)
    part = replace(cfg, out=tmp_path / "part", steps=10)
    train(corpus, model_cfg, part, QUIET)
    new_default = replace(part, steps=16, ema=0.99)
    with pytest.raises(RunDirError, match=r"ema: 0\.0 there, 0\.99 here"):
        train(corpus, model_cfg, new_default, RunOptions(resume="yes", progress="quiet"))
    train(corpus, model_cfg, new_default, RunOptions(resume="yes", progress="quiet", unset=frozenset({"ema"})))
    assert checkpoint.load(part.out, checkpoint.LAST)["train_config"]["ema"] == 0.0
    _same_run(cfg.out, part.out)


def test_the_command_line_resumes_an_old_run_folder(tmp_path, tiny_corpus):
    common = ["train", "--corpus", str(tiny_corpus), "--hidden", "8", "--batch-size", "2", "--seq-len", "8",
              "--eval-every", "2", "--out", str(tmp_path)]
    run_stage(*common, "--ema", "0", "--steps", "2")
    proc = run_stage(*common, "--steps", "4", "--resume")
    assert f"--resume: keeps ema=0.0, as {tmp_path / 'last.pt'} was trained" in proc.stderr
    assert checkpoint.load(tmp_path, checkpoint.LAST)["summary"]["steps"] == 4


@pytest.mark.parametrize("name", ["all", "ema"])
def test_validation_judges_the_saved_weights_without_masks(tmp_path, tiny_corpus, name):
    """checkpoint.pt's validation figure is what evaluating its weights gives, twice the same: no mask or
    dropout reaches evaluation, and under --ema the judged and saved weights are the average."""
    train_opts, model_opts = OPTIONS[name]
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path, **train_opts)
    model_cfg = replace(model_cfg, **model_opts)
    train(corpus, model_cfg, replace(cfg, eval_every=4), QUIET)
    best = checkpoint.load(tmp_path)
    model = CharRNN(model_cfg)
    model.load_state_dict(best["model_state"])
    model.train()  # evaluate() must switch --dropout off itself
    val = corpus.encode(corpus.text)[-int(len(corpus.text) * cfg.val_fraction):]
    runs = [evaluate(model, val, cfg.val_streams, 256, torch.device("cpu"), cfg.seed) for _ in range(2)]
    assert runs[0].carried == runs[1].carried == best["summary"]["best_val_loss"]
    assert runs[0].windowed == best["summary"]["best_val_loss_windowed"]
    last = checkpoint.load(tmp_path, checkpoint.LAST)
    if cfg.ema:  # last.pt: the average as model_state, the training weights beside it, and they differ
        weights = last["resume"]["weights"]
        assert any(not torch.equal(weights[k], v) for k, v in last["model_state"].items())
    else:
        assert "weights" not in last["resume"]


def test_a_regularized_run_exports_plain_weights_and_the_same_contract(tmp_path, tiny_corpus):
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--cell", "lstm", "--layers", "2", "--hidden", "16",
                     "--batch-size", "4", "--seq-len", "16", "--steps", "6", "--weight-drop", "0.5",
                     "--locked-input", "0.2", "--locked-hidden", "0.2", "--locked-output", "0.3", "--ema", "0.9",
                     "--forget-bias", "1", "--out", str(tmp_path))
    assert re.search(r"training at \d+ chars/s", proc.stdout), proc.stdout
    exported = run_stage("export", str(tmp_path))
    assert "whole sequence vs one char at a time" in exported.stdout and "wrote" in exported.stdout


def test_old_dropout_flag_is_unchanged_between_layers():
    """--dropout between layers stays a fresh mask at every time step (not locked): the masks of two time
    steps of one sequence differ."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=9, num_layers=2, hidden_size=64, dropout=0.5)).train()
    seen = {}
    model.layers[1].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    model(torch.randint(0, 9, (2, 5)), model.init_state(2))
    dropped = seen["x"] == 0
    assert not torch.equal(dropped[:, 0], dropped[:, 1])
    assert F.dropout is not None and isinstance(model.drop, nn.Dropout)
