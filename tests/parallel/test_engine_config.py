"""The distributed group's config: what composes, what is refused (naming the keys), and the generated DeepSpeed
JSON. No processes are started here."""

from __future__ import annotations

import json

import pytest

from llmstable.config import ConfigError


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp2", "deepspeed"])
def test_every_engine_file_composes(tiny_config, name):
    assert tiny_config(f"distributed={name}").distributed.name == name


@pytest.mark.parametrize("overrides,match", [
    (["distributed=deepspeed", "distributed.zero_stage=4"], r"distributed.zero_stage=4 must be 0, 1, 2 or 3"),
    (["distributed=fsdp2", "distributed.param_dtype=fp16"], r"distributed.param_dtype='fp16'"),
    (["distributed=fsdp2", "optimizer=spam", "optimizer.density=0.5"], r"optimizer.density=0.5 .*distributed=fsdp2"),
    (["distributed=fsdp2", "optimizer=adamw8bit", "optimizer.backend=bitsandbytes"], r"optimizer.backend=torchao"),
    (["distributed=deepspeed", "distributed.zero_stage=3", "stabilizer=[quant4]", "stabilizer.quant4.group_size=128"],
     r"quant4 .*zero_stage=3"),
    (["distributed=ddp", "distributed.deepspeed_config=x.json"], r"distributed.deepspeed_config is set but"),
    (["distributed=deepspeed", "distributed.deepspeed_config=/nonexistent.json"], r"is not a file"),
    (["distributed=fsdp2", "optimizer=fira"], r"optimizer=fira cannot run under distributed=fsdp2: .*SVD"),
    (["distributed=deepspeed", "optimizer=fira"], r"optimizer=fira cannot run under distributed=deepspeed with "
                                                  r"distributed.zero_stage=2"),
    (["distributed=deepspeed", "stabilizer=[orthograd,norm_growth_limiter]"],
     r"stabilizer=\['orthograd', 'norm_growth_limiter'\] cannot run under distributed=deepspeed"),
])
def test_impossible_engine_combinations_are_refused_by_name(tiny_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*overrides)


def test_a_multi_process_launch_of_single_is_refused(monkeypatch, tiny_config):
    from llmstable.parallel.world import init_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"\(WORLD_SIZE=2\) but distributed=single"):
        init_world(tiny_config().distributed, "cpu")


def test_a_multi_process_launch_needs_run_dir(monkeypatch, capsys):
    from llmstable.cli.train import train_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_command(["distributed=fsdp2", "train.max_steps=1", "train.budget_tokens=null"]) == 2
    assert "needs run_dir=PATH" in capsys.readouterr().err


def test_micro_batches_must_fill_every_rank(tiny_config):
    from llmstable.parallel.world import World
    from llmstable.trainer import build_trainer

    cfg = tiny_config("train.global_batch_size=8", "train.micro_batch_size=8")
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=8 x 2 ranks = 16"):
        build_trainer(cfg, World(world_size=2))


def test_the_deepspeed_json_comes_from_the_config_and_takes_user_keys(tiny_config, tmp_path):
    from llmstable.parallel.deepspeed import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}))
    cfg = tiny_config("distributed=deepspeed", "distributed.zero_stage=3", f"distributed.deepspeed_config={user}")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1  # 8 = 4 x 1 x 2 ranks
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5
    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"sets train_batch_size=64 but the llmstable config gives 8"):
        deepspeed_config(cfg, world_size=2)


@pytest.mark.subprocess
def test_deepspeed_on_cpu_does_not_build_its_inference_only_shared_memory_op(monkeypatch):
    """The switch `skip_inference_comm_op` flips is the one DeepSpeed's comm backend reads before compiling the op;
    its builder would be called (and compile for about a minute) if it were not."""
    from llmstable.parallel.deepspeed import skip_inference_comm_op

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator here is not the CPU one (a GPU machine)")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm",
                        deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"))  # restored after the test
    builder = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
    monkeypatch.setattr(builder, "load", lambda self, *a, **k: pytest.fail("the shm op was built"))
    skip_inference_comm_op()
    assert build_shm_op() is None


def test_a_world_of_one_sets_the_launcher_variables_it_lacks_and_never_a_launchers():
    import os

    from llmstable.parallel.world import launcher_environment

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        os.environ["MASTER_PORT"] = "29999"  # a launcher's
        set_here = launcher_environment()
        assert set(set_here) == {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"}
        assert os.environ["MASTER_PORT"] == "29999" and os.environ["LOCAL_RANK"] == "0"
        for key in keys:
            os.environ.pop(key, None)
        assert "MASTER_PORT" in launcher_environment() and int(os.environ["MASTER_PORT"]) > 0
    finally:
        for key in keys:
            os.environ.pop(key, None)
        os.environ.update(saved)
