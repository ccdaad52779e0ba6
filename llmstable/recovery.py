"""What recovery needs besides checkpoints: the ledger that survives rollbacks, resetting optimizer moments, and
deciding which config changes a resume may accept.

A rollback is a resume from the last good checkpoint plus a data skip (one code path: `Trainer.restore`). The
checkpoint brings back the model, the optimizer, the data position, the RNGs and the detector; the ledger is what
must *not* go back in time: the counters, the data skip list, the LR scale and which faults have fired.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Ledger:
    spikes: int = 0
    rollbacks: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0
    lr_cuts: int = 0
    moment_resets: int = 0
    lr_scale: float = 1.0
    skip_ranges: list = field(default_factory=list)  # [[start, end), ...] of sample ordinals
    faults_fired: list = field(default_factory=list)  # step numbers

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> Ledger:
        return cls(**state) if state else cls()


MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2")


def zero_moments(optimizer: torch.optim.Optimizer) -> int:
    """Zero every first and second moment the optimizer keeps (torch AdamW, SPAM, Stable-SPAM, bitsandbytes,
    torchao); step counts stay, as SPAM's own resets keep them. Returns the number of tensors zeroed."""
    count = 0
    for state in optimizer.state.values():
        for key in MOMENT_KEYS:
            if isinstance(state.get(key), torch.Tensor):
                state[key].zero_()
                count += 1
    return count


# Keys (dotted prefixes) that may change when a run is resumed; each change is logged. Everything else would
# change what the run is (model shape, tokenizer, data, seed, optimizer type, architecture switches) and is
# refused unless resume_force=true.
HARMLESS = (
    "optimizer.lr", "optimizer.weight_decay", "optimizer.compiled", "optimizer.impl", "schedule.",
    "train.budget_tokens", "train.max_steps", "train.max_norm", "train.device", "train.precision", "train.compile",
    "train.log_interval", "train.eval_interval", "train.eval_samples", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.progress", "train.sample_tokens", "train.plot", "train.micro_batch_size",
    "logging.", "run_dir", "resume", "resume_force", "fault.", "data.cache_dir", "stabilizer.spike_guard", "name",
    "stabilizer.zloss", "distributed.",  # the engine may change: the checkpoint loader says which formats it reads
)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(harmless, breaking) changes between two resolved configs, each as 'key: old -> new'."""
    a, b = flatten(old), flatten(new)
    harmless, breaking = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        (harmless if key.startswith(HARMLESS) else breaking).append(line)
    return harmless, breaking
