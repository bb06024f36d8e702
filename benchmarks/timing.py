"""Round-robin step timing for benchmarks that compare several jitted train steps in one run."""

import time

import jax


def loadavg() -> list[str]:
  """The 1, 5 and 15 minute load averages (strings, as /proc/loadavg has them; [] elsewhere)."""
  try:
    with open('/proc/loadavg') as f:
      return f.read().split()[:3]
  except OSError:
    return []


def warm_up(exp, state, steps: int = 2):
  """Compiles and runs `steps` steps of a `train.Experiment`; returns (state, seconds)."""
  t0 = time.perf_counter()
  for step in range(steps):
    state, metrics = exp.train_step(state, exp.batch(step), exp.frozen)
  jax.block_until_ready(metrics)
  return state, time.perf_counter() - t0


def time_round_robin(runs: dict, rounds: int, steps: int = 3) -> dict:
  """`runs`: {label: (experiment, state)}. Times `rounds` rounds of `steps` synchronised steps of
  every run in turn (so slow drifts of a shared machine hit all of them alike).
  Returns {label: [seconds of each timed step]}."""
  states = {label: state for label, (_, state) in runs.items()}
  times = {label: [] for label in runs}
  for _ in range(rounds):
    for label, (exp, _) in runs.items():
      state = states[label]
      for step in range(steps):
        batch = exp.batch(step)
        jax.block_until_ready(batch)
        t0 = time.perf_counter()
        state, metrics = exp.train_step(state, batch, exp.frozen)
        jax.block_until_ready(metrics)
        times[label].append(time.perf_counter() - t0)
      states[label] = state
  return times
