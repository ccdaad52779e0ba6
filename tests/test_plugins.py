"""A new optimizer, engine or loss is one definition plus its registration, all in this file: the config checks,
the builders, the moment reset, sampling and export read what each declares, never a list of names. Each toy is
registered for its test only (the registries are restored after)."""

import dataclasses
import typing

import pytest
import torch

from llmstable.config import ConfigError, LossConfig, OptimizerConfig
from llmstable.config.engines import ENGINES, EngineTraits, register_engine
from llmstable.config.loss import register_loss
from llmstable.config.optimizer import register
from llmstable.metrics import read_jsonl
from llmstable.optimizers import BUILDERS, builds
from llmstable.parallel.engines import Engine


@pytest.fixture
def registries():
    """Whatever a test registers is gone after it."""
    saved = (dict(OptimizerConfig.variants), dict(BUILDERS), dict(ENGINES), dict(LossConfig.variants))
    yield
    for live, old in zip((OptimizerConfig.variants, BUILDERS, ENGINES, LossConfig.variants), saved):
        live.clear()
        live.update(old)


@pytest.mark.trains
def test_a_toy_optimizer_is_its_schema_and_builder(registries, tiny_config, tmp_path):
    @register("toy_sgd")
    @dataclasses.dataclass
    class ToySGDConfig(OptimizerConfig):
        whole_tensors: typing.ClassVar[str] = "the toy reads each whole tensor"
        moment_keys: typing.ClassVar[tuple] = ("momentum_buffer",)
        name: str = "toy_sgd"
        momentum: float = 0.9

    @builds("toy_sgd")
    def build(cfg, model, device, total_steps):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    from llmstable.recovery import zero_moments
    from llmstable.trainer import build_trainer, train

    summary = train(tiny_config("optimizer.name=toy_sgd", "optimizer.momentum=0.5", run_dir=tmp_path / "run"))
    assert summary["steps"] == 6
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match=r"optimizer=toy_sgd cannot run under distributed=fsdp2: the toy reads each"):
        tiny_config("optimizer.name=toy_sgd", "distributed=fsdp2")  # the rule, from what the toy declared
    trainer = build_trainer(tiny_config("optimizer.name=toy_sgd", run_dir=tmp_path / "again"))
    trainer.train_step(0.1)
    assert zero_moments(trainer.engine.base_optimizer, trainer.cfg.optimizer.moment_keys) > 0  # its moments
    assert all(not s["momentum_buffer"].any() for s in trainer.engine.base_optimizer.state.values())
    trainer.run.close()
    trainer.log.close()


class ToyEngine(Engine):
    """One process, like `single`, declared as an engine that cannot be compiled."""


@pytest.mark.trains
def test_a_toy_engine_is_its_class_and_traits(registries, tiny_config, tmp_path):
    ToyEngine.traits = register_engine(EngineTraits("toy_local", "tests.test_plugins:ToyEngine", "a toy",
                                                    can_compile=False, process_group=False))
    from llmstable.trainer import build_trainer, train

    summary = train(tiny_config("distributed.name=toy_local", run_dir=tmp_path / "run"))
    assert summary["engine"] == "toy_local" and summary["steps"] == 6
    trainer = build_trainer(tiny_config("distributed.name=toy_local", "train.compile=false", run_dir=tmp_path / "b"))
    assert type(trainer.engine).__name__ == "ToyEngine" and trainer.forward is trainer.engine.module  # (its target)
    trainer.run.close()
    trainer.log.close()
    with pytest.raises(ConfigError, match=r"train.compile=true cannot take effect under distributed=toy_local"):
        tiny_config("distributed.name=toy_local", "train.compile=true")  # from the trait, not a name


def toy_loss(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The cross-entropy, times a constant."""
    return scale * torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@pytest.mark.trains
def test_a_toy_loss_is_its_schema_and_function(registries, tiny_config, tmp_path):
    @register_loss("toy_scaled")
    @dataclasses.dataclass
    class ToyScaledConfig(LossConfig):
        target: typing.ClassVar[str] = "tests.test_plugins:toy_loss"
        logits_mean: typing.ClassVar[str] = "softmax logits trained on a scaled cross-entropy"
        name: str = "toy_scaled"
        scale: float = 2.0

        def kwargs(self) -> dict:
            return {"scale": self.scale}

    from llmstable.export import LOGITS_NOTE, export_hf
    from llmstable.trainer import train

    train(tiny_config("loss.name=toy_scaled", run_dir=tmp_path / "run"))
    val = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r][-1]
    assert val["val/loss"] == pytest.approx(2 * val["val/softmax_ce"], rel=1e-5)  # its own loss, and the CE beside
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert "scaled cross-entropy" in (out / LOGITS_NOTE).read_text()
