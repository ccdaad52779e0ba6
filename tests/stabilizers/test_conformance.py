"""Every stabilizer and optimizer config file, on a tiny model: it trains, its state round-trips through a
checkpoint, and a resumed run continues bit-identically. One table of tiny settings drives the suite."""

import shutil

import pytest
import torch

from llmstable.compose import CONFIG_DIR
from llmstable.metrics import read_jsonl
from llmstable.trainer import train as train_with

# The canonical tiny settings for each plug-in (what a 6-step run on tiny_1m needs to exercise it).
TINY_SETTINGS = {
    "stabilizer/zloss": ["stabilizer=[zloss]"],
    "stabilizer/qk_norm": ["stabilizer=[qk_norm]"],
    "stabilizer/quant4": ["stabilizer=[quant4]", "stabilizer.quant4.act_bits=8"],
    # with every diagnostic on: the early warning (both signals, LR lowering), the SDC replay, localisation
    "stabilizer/spike_guard": ["stabilizer=[spike_guard]", "stabilizer.spike_guard.min_history=3",
                               "stabilizer.spike_guard.window=6", "stabilizer.spike_guard.good_after_steps=2",
                               "stabilizer.spike_guard.watch=[loss,grad_norm,precond,precond_curvature]",
                               "stabilizer.spike_guard.curvature_interval=2", "stabilizer.spike_guard.replay=true",
                               "stabilizer.spike_guard.warn_lr_factor=0.5", "stabilizer.spike_guard.precond_frac=0.2"],
    "optimizer/adamw": ["optimizer=adamw"],
    "optimizer/spam": ["optimizer=spam", "optimizer.DeltaT=4", "optimizer.warmup_steps=2",
                       "optimizer.grad_accu_steps=1", "optimizer.density=0.5"],
    # total_T fixed, so the 5-step run that gets resumed follows the same cosine as the 8-step one.
    "optimizer/stable_spam": ["optimizer=stable_spam", "optimizer.update_proj_gap=4", "optimizer.total_T=8"],
    "optimizer/adamw8bit": ["optimizer=adamw8bit"],
    # rank 8 and a projector refresh every 2 steps, so the resumed part rebuilds it from the checkpointed state.
    "optimizer/fira": ["optimizer=fira", "optimizer.rank=8", "optimizer.update_proj_gap=2"],
    "optimizer/s3": ["optimizer=s3", "optimizer.lr=3e-3"],
    "optimizer/muon": ["optimizer=muon"],
    "optimizer/lion": ["optimizer=lion"],
    # a refresh of the eigenbasis every 2 steps, so the resumed part refreshes from the checkpointed state.
    "optimizer/soap": ["optimizer=soap", "optimizer.precondition_frequency=2"],
    "optimizer/adam_mini": ["optimizer=adam_mini"],
    "stabilizer/emb_grad_shrink": ["stabilizer=[emb_grad_shrink]"],
    # gradient hooks (on_gradients, before clipping)
    "stabilizer/norm_growth_limiter": ["stabilizer=[norm_growth_limiter]"],
    "stabilizer/orthograd": ["stabilizer=[orthograd]"],
    # update hooks (before_update / on_update): a window of 2 from the first update and a tight k, so that the
    # warm-up's growing updates get clipped; tau low enough that tiny_1m's heads get rescaled.
    "stabilizer/update_clip": ["stabilizer=[update_clip]", "stabilizer.update_clip.window=2",
                               "stabilizer.update_clip.min_history=1", "stabilizer.update_clip.k=1.05"],
    "stabilizer/qk_clip": ["stabilizer=[qk_clip]", "stabilizer.qk_clip.tau=0.3"],
    # losses that replace the cross-entropy (compute_loss), each with the softmax-collapse monitor
    "loss/stablemax": ["loss=stablemax", "stabilizer=[softmax_collapse]"],
    "loss/spherical_z": ["loss=spherical_z", "stabilizer=[softmax_collapse]"],
}
UPDATE_CLIP = TINY_SETTINGS["stabilizer/update_clip"][1:]
# Config files the entries above exercise without an entry of their own.
COVERED_ELSEWHERE = {"loss/cross_entropy": "every entry (the default loss)",
                     "stabilizer/softmax_collapse": "loss/stablemax, loss/spherical_z"}
COMBINED = ["optimizer=stable_spam", "optimizer.update_proj_gap=4", "optimizer.total_T=8",
            "stabilizer=[zloss,qk_norm,quant4,emb_grad_shrink,orthograd,norm_growth_limiter,update_clip]", *UPDATE_CLIP]
# QK-clip excludes QK-norm, so the run with the hook points' test stabilizers takes it in QK-norm's place.
COMBINED_QK_CLIP = ["optimizer=stable_spam", "optimizer.update_proj_gap=4", "optimizer.total_T=8",
                    "stabilizer=[zloss,qk_clip,quant4,emb_grad_shrink,orthograd,norm_growth_limiter,update_clip]",
                    "stabilizer.qk_clip.tau=0.3", *UPDATE_CLIP]


def test_the_table_covers_every_config_file():
    files = {f"{p.parent.name}/{p.stem}" for group in ("stabilizer", "optimizer", "loss")
             for p in (CONFIG_DIR / group).glob("*.yaml")}
    assert files == set(TINY_SETTINGS) | set(COVERED_ELSEWHERE)


def loss_rows(run_dir):
    keep = ("train/loss", "optim/grad_norm", "train/z_loss", "stab/spam/clipped", "stab/stable_spam/clipped",
            "stab/update_clip/clipped", "stab/qk_clip/clipped_heads", "stab/qk_clip/max_logit",
            "stab/softmax_collapse", "stab/precond/stale_frac", "stab/precond/curvature", "optim/lr")
    return {r["step"]: {k: r[k] for k in keep if k in r} for r in read_jsonl(run_dir / "metrics.jsonl")
            if "train/loss" in r}


def hook_stabilizers():
    """The hook points' test stabilizers (tests/stabilizers/test_hooks.py), all at once, with every optimizer-side
    stabilizer; a replay at step 6, after the resume point."""
    from test_hooks import DoubleLoss, HalveGradients, PinFinalNorm, ReplayStep

    return (HalveGradients(), PinFinalNorm(), DoubleLoss(), ReplayStep(at=6))


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TINY_SETTINGS, "combined", "hooks"])
@pytest.mark.trains
def test_trains_round_trips_and_resumes_bit_identically(name, tiny_config, tmp_path):
    overrides = {"combined": COMBINED, "hooks": COMBINED_QK_CLIP}.get(name) or TINY_SETTINGS[name]
    extra = hook_stabilizers if name == "hooks" else tuple

    def train(cfg):
        return train_with(cfg, extra_stabilizers=extra())

    full = train(tiny_config(*overrides, "train.max_steps=8", run_dir=tmp_path / "full"))
    rows = loss_rows(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows.values())
    assert rows[8]["train/loss"] < rows[1]["train/loss"]  # it trains
    if "zloss" in " ".join(overrides):
        assert all(r["train/z_loss"] > 0 for r in rows.values())
    for plugin, metric in (("update_clip", "stab/update_clip/clipped"), ("qk_clip", "stab/qk_clip/clipped_heads")):
        if plugin in " ".join(overrides):  # the tiny settings make it act
            assert sum(r[metric] for r in rows.values()) > 0, (name, metric)
    # Stop after 5 steps with the last checkpoint at 3, then resume with the full budget.
    train(tiny_config(*overrides, "train.max_steps=5", run_dir=tmp_path / "part"))
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000005")
    resumed = train(tiny_config(*overrides, "train.max_steps=8", run_dir=tmp_path / "part"))
    assert resumed["resumed_from_step"] == 3
    again = loss_rows(tmp_path / "part")
    for step in range(4, 9):
        assert again[step] == rows[step], (name, step)
    assert resumed["final_val_loss"] == full["final_val_loss"]
