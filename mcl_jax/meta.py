"""Meta-optimisation through unrolled virtual SGD steps (L-MCL, docs/methods.md#l-mcl-meta-step).

Pure functions of pytrees. `theta` are the parameters the virtual steps move, `phi` the
meta-parameters (L-MCL's layer-matching network); `inner_loss(theta, phi)` and `outer_loss(theta)`
are scalar functions. The trajectory is

    v_0 = 0
    for n = 1 .. inner_steps + 1:        (objective O_n = inner_loss(., phi), the last one outer_loss)
      v_n     = momentum * v_{n-1} + grad_theta O_n(theta_{n-1}) + weight_decay * theta_{n-1}
      theta_n = theta_{n-1} - lr * v_n
    hyper-objective = outer_loss(theta_{inner_steps + 1})

(SGD with heavy-ball momentum and coupled weight decay, a fresh momentum buffer per round, every
leaf moved in every step: leaves an objective does not touch move by weight decay and momentum).
`weight_decay` is a scalar for every leaf, or a pytree like theta giving each leaf its own (0 for
the leaves the real optimizer's `optim.wd_mask` spares, so the virtual steps mirror it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

InnerLoss = Callable  # (theta, phi) -> scalar
OuterLoss = Callable  # theta -> scalar

MODES = ('exact', 'official')
SECOND_ORDER = ('reverse_over_forward', 'reverse_over_reverse')
# 'one': the whole round is one program (`hypergradient`); 'per_step': one program per virtual step
# and per reverse step, each compiled once and reused (`per_step_hypergradient`).
PROGRAMS = ('one', 'per_step')


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static choices of a meta-optimisation round (see `hypergradient` for each)."""

  inner_steps: int
  momentum: float
  mode: str = 'exact'
  second_order: str = 'reverse_over_forward'
  unroll: bool = True
  remat: bool = True


class Problem(NamedTuple):
  """One round's inputs: `phi` and `theta0` (pytrees), `inner_loss(theta, phi)`,
  `outer_loss(theta)`, the virtual steps' `lr` and `weight_decay` (scalar or pytree like theta0)."""

  phi: Any
  theta0: Any
  inner_loss: InnerLoss
  outer_loss: OuterLoss
  lr: Any
  weight_decay: Any


def gradient_fn(loss: Callable, second_order: str = 'reverse_over_forward') -> Callable:
  """`jax.grad(loss)` (w.r.t. the first argument) for differentiating once more.

  Reverse-differentiating the virtual steps needs the VJP of this gradient: for a cotangent u,
  (H u, (d/d rest grad)^T u), i.e. the gradient w.r.t. (theta, *rest) of the directional derivative
  <grad loss, u>. 'reverse_over_reverse' is plain `jax.grad` of `jax.grad`. 'reverse_over_forward'
  gives the same numbers through a `jax.custom_vjp` whose backward pass is `jax.grad` of
  `jax.jvp(loss, theta, u)`: on XLA:CPU 3.2x faster than reverse-over-reverse for L-MCL's
  ResNet-8 x 2 (269 vs 848 ms at batch 32, benchmarks/results/lmcl.md), and it keeps only its
  inputs per step for the backward pass, which recomputes the forward pass.
  """
  if second_order == 'reverse_over_reverse':
    return jax.grad(loss)
  if second_order != 'reverse_over_forward':
    raise ValueError(f'second_order {second_order!r} is not one of {SECOND_ORDER}.')

  def grad_fn(theta, *rest):
    converted, consts = _hoist_closure(loss, theta, *rest)
    return _reverse_over_forward_grad(converted, len(rest), theta, *rest, *consts)

  return grad_fn


def _hoist_closure(fn, *example_args):
  """(pure_fn, consts) with pure_fn(*args, *consts) == fn(*args) for scalar-valued fn.

  Every array `fn` closes over (the batch, BN statistics, ...) becomes an explicit argument: a
  custom VJP rule must not capture tracers of the enclosing jit, or they leak into the rule's own
  trace under `jax.checkpoint`. (`jax.closure_convert` hoists only the floating-point ones.)
  """
  closed = jax.make_jaxpr(fn)(*example_args)
  num_args = len(jax.tree.leaves(example_args))

  def pure_fn(*args_and_consts):
    split = len(args_and_consts) - len(closed.consts)
    args, consts = args_and_consts[:split], args_and_consts[split:]
    flat_args = jax.tree.leaves(args)
    if len(flat_args) != num_args:
      raise TypeError(f'expected {num_args} array arguments, got {len(flat_args)}')
    return jax.core.eval_jaxpr(closed.jaxpr, list(consts), *flat_args)[0]

  return pure_fn, list(closed.consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reverse_over_forward_grad(loss, num_rest, theta, *args):
  """grad_theta loss(theta, *args); args = the loss's other arguments, then its hoisted consts."""
  del num_rest
  return jax.grad(loss)(theta, *args)


def _reverse_over_forward_fwd(loss, num_rest, theta, *args):
  return _reverse_over_forward_grad(loss, num_rest, theta, *args), (theta, args)


def _reverse_over_forward_bwd(loss, num_rest, residuals, u):
  theta, args = residuals
  rest, consts = args[:num_rest], args[num_rest:]
  directional = lambda th, r: jax.jvp(lambda x: loss(x, *r, *consts), (th,), (u,))[1]  # noqa: E731
  d_theta, d_rest = jax.grad(directional, argnums=(0, 1))(theta, rest)
  return (d_theta, *d_rest, *(None,) * len(consts))  # no gradient to the hoisted consts


_reverse_over_forward_grad.defvjp(_reverse_over_forward_fwd, _reverse_over_forward_bwd)


def _axpy(a, x, y):
  """a * x + y over matching pytrees."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def per_leaf(value, tree):
  """`value` as a pytree like `tree`: a scalar is repeated for every leaf, a pytree kept."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
    return jax.tree.map(lambda _: value, tree)
  return value


def virtual_sgd_step(theta, velocity, grad, *, lr, weight_decay, momentum):
  """One heavy-ball step: v' = momentum * v + grad + wd * theta; theta' = theta - lr * v'.

  Returns (theta', v'). Differentiable in every argument. weight_decay: scalar or per-leaf pytree.
  """
  velocity = jax.tree.map(
      lambda v, g, t, wd: momentum * v + g + wd * t,
      velocity,
      grad,
      theta,
      per_leaf(weight_decay, theta),
  )
  return _axpy(-lr, velocity, theta), velocity


def unrolled_outer_loss(
    phi,
    theta0,
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    *,
    lr,
    weight_decay,
    momentum: float,
    inner_steps: int,
    remat: bool = True,
    unroll: bool = True,
    second_order: str = 'reverse_over_forward',
):
  """outer_loss(theta_{inner_steps+1}(phi)): the hyper-objective, differentiable in phi.

  unroll: the inner steps as a `lax.scan` with `unroll=True`, i.e. straight-line code. As a
  rolled loop (XLA while) the 2-step trajectory ran ~15x slower on XLA:CPU (10.5 s vs 0.72 s,
  ResNet-8 x 2, batch 32; the hyper-gradient 26 s vs 4.3 s) and compiled slower; but only the
  rolled loop keeps `remat` effective: unrolled, XLA schedules the straight-line program itself
  and the temporary memory is the same with or without remat (BENCHMARKS.md §2).
  remat: wrap every virtual step in `jax.checkpoint`, so differentiating this keeps only the
  step boundaries (theta_n, v_n) alive, not every step's activations and inner gradients.
  second_order: how each step's gradient is differentiated again (`gradient_fn`).
  """
  maybe_remat = jax.checkpoint if remat else (lambda f: f)
  inner_grad = gradient_fn(inner_loss, second_order)
  outer_grad = gradient_fn(outer_loss, second_order)

  @maybe_remat
  def inner_step(carry, _):
    theta, velocity = carry
    return (
        virtual_sgd_step(
            theta,
            velocity,
            inner_grad(theta, phi),
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
        ),
        None,
    )

  @maybe_remat
  def outer_step(theta, velocity):
    return virtual_sgd_step(
        theta, velocity, outer_grad(theta), lr=lr, weight_decay=weight_decay, momentum=momentum
    )

  carry = (theta0, jax.tree.map(jnp.zeros_like, theta0))
  (theta, velocity), _ = jax.lax.scan(inner_step, carry, None, length=inner_steps, unroll=unroll)
  theta, _ = outer_step(theta, velocity)
  return outer_loss(theta)


def hypergradient(
    phi,
    theta0,
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    *,
    lr,
    weight_decay,
    momentum: float,
    inner_steps: int,
    mode: str = 'exact',
    remat: bool = True,
    unroll: bool = True,
    second_order: str = 'reverse_over_forward',
):
  """G_phi = d outer_loss(theta_{inner_steps+1}) / d phi, a pytree like phi.

  mode 'exact': nested `jax.grad` of `unrolled_outer_loss` (second order through every step).
  mode 'official': the L-MCL authors' hand-written reverse recursion (`MetaSGD.meta_backward`),
    which couples the momentum adjoint into the parameter adjoint with factor 1 instead of
    weight_decay. For inner_steps = 0 or 1 it equals 'exact'; for inner_steps = 2 exactly
        G_official - G_exact = (1 - wd) * momentum * lr^2 * J_1^T grad outer_loss(theta_3),
    J_1 = d/dphi grad_theta inner_loss(theta_0, phi), i.e. ~lr * momentum relative
    (docs/methods.md#l-mcl-hyper-gradient-exact-vs-official).
  """
  if mode == 'exact':
    return jax.grad(unrolled_outer_loss)(
        phi,
        theta0,
        inner_loss,
        outer_loss,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        inner_steps=inner_steps,
        remat=remat,
        unroll=unroll,
        second_order=second_order,
    )
  if mode == 'official':
    return _adjoint_hypergradient(
        phi,
        theta0,
        inner_loss,
        outer_loss,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        inner_steps=inner_steps,
        coupling=1.0,
        second_order=second_order,
    )
  raise ValueError(f'meta_grad mode {mode!r} is not one of {MODES}.')


def _adjoint_hypergradient(
    phi,
    theta0,
    inner_loss,
    outer_loss,
    *,
    lr,
    weight_decay,
    momentum,
    inner_steps,
    coupling,
    second_order='reverse_over_forward',
):
  """Reverse recursion over the recorded trajectory with Hessian-vector products by `jax.vjp`.

  Adjoints a0 (params) = grad outer_loss(theta_last), a1 (momentum buffer) = 0; for n = last .. 1:
      U = a1 - lr * a0;  G += (d/dphi g_n)^T U;  a0 <- (1 - lr*wd) a0 + coupling * a1 + H_n U;
      a1 <- momentum * U.
  coupling = weight_decay is the exact reverse of `virtual_sgd_step`; 1 is the authors' code.
  weight_decay and coupling: scalars or per-leaf pytrees like theta0.
  """
  grad_fns = _step_gradients(inner_loss, outer_loss, inner_steps, second_order)
  theta, velocity, pre_step = theta0, jax.tree.map(jnp.zeros_like, theta0), []
  for grad_fn in grad_fns:
    pre_step.append(theta)
    theta, velocity = _forward_step(grad_fn, theta, velocity, phi, lr, weight_decay, momentum)
  adjoint = _adjoint_start(outer_loss, theta, phi)
  for grad_fn, theta_prev in zip(reversed(grad_fns), reversed(pre_step)):
    adjoint = _reverse_step(grad_fn, theta_prev, phi, adjoint, lr, weight_decay, momentum, coupling)
  return adjoint[2]


def _step_gradients(inner_loss, outer_loss, inner_steps, second_order):
  """The gradient function g_n(theta, phi) of each virtual step n = 1 .. inner_steps + 1."""
  outer_grad = gradient_fn(lambda theta, phi: outer_loss(theta), second_order)  # phi unused
  return [gradient_fn(inner_loss, second_order)] * inner_steps + [outer_grad]


def _forward_step(grad_fn, theta, velocity, phi, lr, weight_decay, momentum):
  """Virtual step n: (theta_n, v_n) from (theta_{n-1}, v_{n-1})."""
  return virtual_sgd_step(
      theta, velocity, grad_fn(theta, phi), lr=lr, weight_decay=weight_decay, momentum=momentum
  )


def _adjoint_start(outer_loss, theta_last, phi):
  """(a0, a1, G) at the end of the trajectory: (grad outer_loss(theta_last), 0, 0)."""
  a0 = jax.grad(outer_loss)(theta_last)
  return a0, jax.tree.map(jnp.zeros_like, a0), jax.tree.map(jnp.zeros_like, phi)


def _reverse_step(grad_fn, theta_prev, phi, adjoint, lr, weight_decay, momentum, coupling):
  """One step of `_adjoint_hypergradient`'s recursion: (a0, a1, G) before virtual step n."""
  a0, a1, g_phi = adjoint
  u = _axpy(-lr, a0, a1)
  _, vjp = jax.vjp(grad_fn, theta_prev, phi)
  hessian_u, cross_u = vjp(u)
  g_phi = jax.tree.map(jnp.add, g_phi, cross_u)
  a0 = jax.tree.map(
      lambda x0, x1, hu, wd, c: (1 - lr * wd) * x0 + c * x1 + hu,
      a0,
      a1,
      hessian_u,
      per_leaf(weight_decay, a0),
      per_leaf(coupling, a0),
  )
  return a0, jax.tree.map(lambda x: momentum * x, u), g_phi


def _coupling(mode, weight_decay):
  """The momentum adjoint's coupling of `mode` (`_adjoint_hypergradient`)."""
  if mode not in MODES:
    raise ValueError(f'meta_grad mode {mode!r} is not one of {MODES}.')
  return weight_decay if mode == 'exact' else 1.0


def hypergradient_of(problem: Problem, settings: Settings):
  """`hypergradient` of a `Problem` under `Settings`: the round as one program."""
  return hypergradient(
      problem.phi,
      problem.theta0,
      problem.inner_loss,
      problem.outer_loss,
      lr=problem.lr,
      weight_decay=problem.weight_decay,
      **dataclasses.asdict(settings),
  )


def per_step_hypergradient(
    problem_fn: Callable[..., Problem], settings: Settings, jit: Callable = jax.jit
) -> Callable:
  """`hypergradient_of(problem_fn(*args), settings)` as a sequence of small jitted programs.

  Returns `fn(*args) -> G_phi`. The recursion of `_adjoint_hypergradient` (coupling = weight decay
  for mode 'exact': the same numbers as the one-program nested `jax.grad`, to round-off; 1 for
  'official'), driven from Python: a program for the start (theta0), one per kind of virtual step
  (the inner steps share one), one for grad outer_loss at the end and one per kind of reverse step,
  so an inner step is compiled once however many there are, and no program holds more than one
  step's working set (compile time and memory: docs/performance.md#l-mcl-meta-step). Every program rebuilds
  the problem from `args` (the closures are re-traced, the arrays are the same), so `problem_fn`
  must be deterministic: its random choices keyed by its arguments. `unroll` and `remat` do not
  apply. `jit`: how each program is jitted (e.g. with compiler options).
  """

  def grad_fns(problem):
    return _step_gradients(
        problem.inner_loss, problem.outer_loss, settings.inner_steps, settings.second_order
    )

  def start(*args):
    problem = problem_fn(*args)
    return problem.theta0, jax.tree.map(jnp.zeros_like, problem.theta0)

  def forward(n):
    def step(theta, velocity, *args):
      problem = problem_fn(*args)
      return _forward_step(
          grad_fns(problem)[n],
          theta,
          velocity,
          problem.phi,
          problem.lr,
          problem.weight_decay,
          settings.momentum,
      )

    return jit(step)

  def adjoint_start(theta_last, *args):
    problem = problem_fn(*args)
    return _adjoint_start(problem.outer_loss, theta_last, problem.phi)

  def reverse(n):
    def step(theta_prev, adjoint, *args):
      problem = problem_fn(*args)
      return _reverse_step(
          grad_fns(problem)[n],
          theta_prev,
          problem.phi,
          adjoint,
          problem.lr,
          problem.weight_decay,
          settings.momentum,
          _coupling(settings.mode, problem.weight_decay),
      )

    return jit(step, donate_argnums=1)

  _coupling(settings.mode, 0.0)  # validate the mode now, not at the first call
  last = settings.inner_steps  # index of the outer (CE) step
  # The inner steps are one function (index 0), the outer step another: compiled once each.
  programs = {
      'start': jit(start),
      'forward': (forward(0), forward(last)),
      'adjoint_start': jit(adjoint_start),
      'reverse': (reverse(0), reverse(last)),
  }

  def fn(*args):
    theta, velocity = programs['start'](*args)
    trajectory = []
    for n in range(last + 1):
      trajectory.append(theta)
      theta, velocity = programs['forward'][n == last](theta, velocity, *args)
    adjoint = programs['adjoint_start'](theta, *args)
    for n in reversed(range(last + 1)):
      adjoint = programs['reverse'][n == last](trajectory[n], adjoint, *args)
    return adjoint[2]

  return fn


def meta_optimizer(weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """phi's persistent optimizer without the learning rate: coupled weight decay + Nesterov
  momentum (torch.optim.SGD(nesterov=True)); apply as `phi - lr * updates`."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum, nesterov=True)
  )


def meta_sgd_update(phi, grads, opt_state, lr, *, weight_decay: float, momentum: float):
  """One step of `meta_optimizer` at learning rate lr. Returns (phi', opt_state')."""
  updates, opt_state = meta_optimizer(weight_decay, momentum).update(grads, opt_state, phi)
  return _axpy(-lr, updates, phi), opt_state
