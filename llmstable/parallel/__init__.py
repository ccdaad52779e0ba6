"""Running on several processes with existing engines: DDP and FSDP2 (torch), DeepSpeed ZeRO.

- `world`: the process group, this rank and its device, and the few collectives the loop needs;
- `dtensors`: reductions over DTensor shards (FSDP2) that every rank calls alike;
- `engines`: how each engine steps and checkpoints (`deepspeed` for DeepSpeed, imported only when asked for);
- `build`: the engine a run's config chooses (its traits are declared in llmstable.config.engines);
- `weights`: any checkpoint's weights into one plain model.

The package imports none of them: the lower modules (`world`, `dtensors`) load without the engines.
"""
