"""The run folder: which files are the trainer's, refusing to train over a run by accident, --overwrite,
and whether last.pt belongs to the run being asked for (--resume may change only the budget)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train import checkpoint

METRICS = "metrics.jsonl"
PLOT = "loss.png"
# Never model.onnx: export writes it, and a running server may be reading it.
TRAINER_FILES = (checkpoint.FILENAME, checkpoint.LAST, METRICS, PLOT)
BUDGET = ("steps", "epochs", "time_budget")
# Settings that change nothing a resumed run computes: where it runs and where it writes.
OPERATIONAL = ("out", "device", "compile", "tf32")
# What a last.pt written before the option existed trained with: such runs still resume.
ADDED_LATER = {"dtype": "float32", "weight_drop": 0.0, "locked_input": 0.0, "locked_hidden": 0.0,
               "locked_output": 0.0, "ema": 0.0, "forget_bias": None}

# Defaults that changed, with the value runs begun before the change trained with. On --resume an option left
# unset that last.pt holds at that old value keeps it (CHANGELOG.md): the old run continues as it was trained.
CHANGED_DEFAULTS = {"ema": 0.0}


class RunDirError(ValueError):
    """The run folder does not hold what was asked for (a used folder, an incompatible last.pt)."""


def held(out: Path) -> list[str]:
    """The trainer's files present in out, in TRAINER_FILES order."""
    return [name for name in TRAINER_FILES if (Path(out) / name).exists()]


def clear(out: Path) -> list[str]:
    """--overwrite: remove the trainer's files and the temporary files of interrupted saves."""
    out = Path(out)
    removed = held(out)
    for name in removed:
        (out / name).unlink()
    for name in TRAINER_FILES:
        for tmp in out.glob(f"{name}.*.tmp"):
            tmp.unlink()
    return removed


def refuse_used(out: Path, files: list[str]) -> RunDirError:
    return RunDirError(
        f"{out} already holds a run ({', '.join(files)}); pass --resume to continue it, or --overwrite to "
        f"replace it (model.onnx is left alone)")


def corpus_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def saved_setting(saved: dict[str, Any], key: str) -> Any:  # Any: each setting has its own type
    """A training setting as last.pt holds it; for a last.pt older than the option, the value it trained with."""
    return saved["train_config"].get(key, ADDED_LATER.get(key))


def mismatches(saved: dict[str, Any], sha256: str, vocab: tuple[str, ...], model_config: dict[str, Any],
               train_config: dict[str, Any]) -> list[str]:
    """What differs between last.pt and the run asked for, other than the budget and where it runs."""
    problems = []
    if saved.get("corpus_sha256") != sha256:
        problems.append("the corpus text differs (SHA-256 "
                        f"{str(saved.get('corpus_sha256'))[:12]}... there, {sha256[:12]}... here)")
    if list(saved["vocab"]) != list(vocab):
        problems.append("the vocabulary differs")
    for key, value in model_config.items():
        if saved["model_config"].get(key) != value:
            problems.append(f"model {key}: {saved['model_config'].get(key)!r} there, {value!r} here")
    for key, value in train_config.items():
        if key in BUDGET or key in OPERATIONAL:
            continue
        there = saved_setting(saved, key)
        if there != value:
            problems.append(f"{key}: {there!r} there, {value!r} here")
    return problems


def kept_defaults(saved: dict[str, Any], train_config: dict[str, Any], unset: frozenset[str]) -> dict[str, Any]:
    """The settings a resumed run keeps from last.pt: those left unset (unset) whose default changed since
    last.pt was written, which last.pt holds at the old default and the run asked for holds at the new."""
    kept = {}
    for key in unset & CHANGED_DEFAULTS.keys():
        there = saved_setting(saved, key)
        if there == CHANGED_DEFAULTS[key] and train_config[key] != there:
            kept[key] = there
    return kept


LATEST = "latest"  # in a --runs folder: a link to the run trained last, which export publishes


def identity(sha256: str, vocab: tuple[str, ...], model_config: dict[str, Any], train_config: dict[str, Any],
             tag: str = "") -> str:
    """The run's identity as a folder name: a hash of what --resume compares (corpus text, vocabulary, model
    config, every training setting but the budget and where it runs) and TAG, which starts a run afresh
    with the same settings. Equal identities resume one run; any difference trains a run of its own."""
    what = {"corpus_sha256": sha256, "vocab": list(vocab), "model": model_config, "tag": tag,
            "train": {k: v for k, v in train_config.items() if k not in BUDGET and k not in OPERATIONAL}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def point_latest(runs: Path, name: str) -> None:
    """RUNS/latest -> NAME, replaced in one rename (export reads RUNS/latest while this may run again)."""
    tmp = runs / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, runs / LATEST)


def config_dict(cfg: Any) -> dict[str, Any]:  # Any: a dataclass instance
    """A dataclass config as builtins only (paths as strings), as checkpoints store it."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def rng_states() -> dict[str, Any]:
    """Every RNG a run may draw from, as tensors and builtins (last.pt loads with weights_only=True)."""
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # the MT19937 tuple, not the dict form
    kind, keys, pos, has_gauss, gauss = legacy
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
