"""Silent-data-corruption replay: tell a hardware fault from a real spike by computing the spiky step again.

Ma et al. 2025 ("Understanding Silent Data Corruption in LLM Training") show that faulty
machines produce wrong results silently and intermittently, and Megatron-LM's rerun state machine
(`megatron/core/rerun_state_machine.py`) re-runs a suspicious step to find out. With
`stabilizer.spike_guard.replay=true`, the spike guard asks for `Action("replay")` when it detects a spike: the
trainer recomputes the step from the same weights, with the same batch and the same RNG state, and hands both
results to `on_replay`. On a deterministic machine a real spike (bad data, or the optimisation itself) comes back
bit for bit; a transient fault does not:
- bit-identical: a real spike; the guard's ladder goes on as without the replay (skip, roll back, ...);
- different: a suspected hardware fault (`sdc_suspect`, with both results); no data is skipped, the step goes on
  with the replayed result, and after `max_sdc` suspects the run stops (exit code 4) with a message to check the
  machine.
The cost is one extra forward and backward per detected spike, nothing on clean steps (the replay point, the
loader position and the RNG states, is a few small host objects kept each step). Determinism is the premise: on
GPUs, kernels that reduce in a varying order (atomics) make every replay differ; run with
`torch.use_deterministic_algorithms(True)` there.
"""

from __future__ import annotations

from llmstable.stabilizers.hooks import SuspectedHardwareFault


class SDCReplay:
    """The replay's bookkeeping, owned by the spike guard: which step was replayed, and the suspect count (which a
    rollback does not undo)."""

    def __init__(self, max_sdc: int):
        self.max_sdc = max_sdc
        self.suspects = 0
        self.replaying: int | None = None  # the step whose replay is under way

    def compare(self, step: int, first: dict[str, float], replayed: dict[str, float]) -> dict | None:
        """None if the replay reproduced the step bit for bit; else the `sdc_suspect` event's fields. Raises
        SuspectedHardwareFault at the max_sdc-th suspect."""
        self.replaying = None
        if all(_same(first[k], replayed[k]) for k in first):
            return None
        self.suspects += 1
        fields = {"first": first, "replayed": replayed, "suspects": self.suspects, "max_sdc": self.max_sdc}
        if self.suspects >= self.max_sdc:
            raise SuspectedHardwareFault(
                f"step {step} gave different results when recomputed from the same state, batch and RNG "
                f"(first {first}, replayed {replayed}): {self.suspects} such silent-data-corruption suspects "
                f"(stabilizer.spike_guard.max_sdc={self.max_sdc}). Check the machine (run the GPU vendor's "
                "diagnostics, e.g. NVIDIA DCGM `dcgmi diag -r 3`, and compare against another node), then resume "
                "from the last checkpoint; no data was skipped for these steps.")
        return fields

    def state_dict(self) -> dict:
        return {"suspects": self.suspects}

    def load_state_dict(self, state: dict) -> None:
        self.suspects = max(self.suspects, state.get("suspects", 0))  # a counter: a rollback does not undo it


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # bit-identical floats; NaN reproduced counts as reproduced
