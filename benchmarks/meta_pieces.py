r"""Where the L-MCL meta step's time goes: its pieces, jitted one by one (CPU profile helper).

    python benchmarks/meta_pieces.py --batch 32 [--rolled] [--no-fast-path] [--flops]
    python benchmarks/meta_pieces.py --batch 64 --rolled --memory-only

ResNet-8 x 2 L-MCL on a fixed random CIFAR-shaped batch (benchmarks/cohort_step.py): the inner
loss, its gradient, the outer (CE) gradient, the second-order VJP of the inner gradient (H u and
the cross term to phi) and the exact hyper-gradient by each `meta.SECOND_ORDER` rule, the 2 + 1
virtual-step trajectory (forward only), each as
"compile + first call" and the best of 2 further calls; `--rolled` runs the virtual steps as a
rolled `lax.scan` (`method.meta_unroll=False`) instead of unrolled.
"""

import argparse
import time

import jax

from cohort_step import AUG, build_step
from mcl_jax import meta, methods, step as step_lib


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--rolled', action='store_true')
  ap.add_argument('--no-fast-path', action='store_true')
  ap.add_argument('--flops', action='store_true', help="also XLA's cost analysis of each piece")
  ap.add_argument(
      '--memory-only',
      action='store_true',
      help="only the hyper-gradient's temporary memory with / without jax.checkpoint",
  )
  args = ap.parse_args()
  fast = not args.no_fast_path
  options = step_lib.compiler_options(enabled=fast)
  cohort, state, _, data = build_step('resnet8', 2, 'lmcl', 'auto', args.batch, fast_path=fast)
  method_config = methods.config('lmcl')
  method = methods.build(method_config)
  batch, _ = step_lib.augmented_batch(data, state.step, 0, AUG)
  theta0, inner, outer = method.meta_objectives(state, batch, cohort)
  phi = state.method_state['phi']
  kw = dict(lr=0.05, weight_decay=5e-4, momentum=0.9, inner_steps=2, unroll=not args.rolled)

  def timed(name, fn, *fn_args):
    jitted = jax.jit(fn, compiler_options=options)
    if args.flops:
      cost = jitted.lower(*fn_args).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      print(f"{name:32s} {cost.get('flops', 0) / 1e9:8.2f} GFLOP", flush=True)
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*fn_args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(2):
      t0 = time.perf_counter()
      jax.block_until_ready(jitted(*fn_args))
      runs.append(time.perf_counter() - t0)
    print(f'{name:32s} compile + 1st {first:6.1f} s   run {1e3 * min(runs):9.1f} ms', flush=True)

  if args.memory_only:
    for order in meta.SECOND_ORDER:
      for remat in (True, False):
        compiled = (
            jax.jit(
                lambda p, th, r=remat, o=order: meta.hypergradient(
                    p, th, inner, outer, remat=r, second_order=o, **kw
                ),
                compiler_options=options,
            )
            .lower(phi, theta0)
            .compile()
        )
        mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        print(
            f"hyper-gradient temp memory, {order}, {'rolled' if args.rolled else 'unrolled'}, "
            f"{'with' if remat else 'without'} jax.checkpoint: {mib:.1f} MiB",
            flush=True,
        )
    return

  # The VJP of the inner gradient (H u and the cross term to phi), as the hyper-gradient takes it.
  second_vjp = lambda order: lambda th, ph: jax.vjp(  # noqa: E731
      meta.gradient_fn(inner, order), th, ph
  )[1](th)
  timed('inner loss', inner, theta0, phi)
  timed('grad of the inner loss', jax.grad(inner), theta0, phi)
  timed('grad of the outer loss', jax.grad(outer), theta0)
  for order in meta.SECOND_ORDER:
    timed(f'second-order VJP, {order}', second_vjp(order), theta0, phi)
  timed(
      'virtual steps, forward only',
      lambda p, th: meta.unrolled_outer_loss(p, th, inner, outer, **kw),
      phi,
      theta0,
  )
  for order in meta.SECOND_ORDER:
    timed(
        f'exact hyper-gradient, {order}',
        lambda p, th, o=order: meta.hypergradient(p, th, inner, outer, second_order=o, **kw),
        phi,
        theta0,
    )


if __name__ == '__main__':
  main()
