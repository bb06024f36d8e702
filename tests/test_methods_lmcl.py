"""L-MCL: the meta-gradient machinery (mcl_jax.meta) against hand derivations and finite
differences in float64, the method's terms against independent NumPy / loop references on a
heterogeneous cohort, and a smoke training run with the meta step."""

import json
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import REPO, tiny_config
from mcl_jax import checkpoint as ckpt_lib
from mcl_jax import cohort as cohort_lib
from mcl_jax import config_lib, losses, meta, methods, train
from mcl_jax import step as step_lib
from mcl_jax.step import LossContext

LR, WD, MU = 0.3, 5e-4, 0.9


# ---------------------------------------------------------------------------------------------- #
# mcl_jax.meta on toys.
# ---------------------------------------------------------------------------------------------- #
def quadratic_problem(size=5, seed=0):
  """inner = 0.5 sum(phi * theta^2), outer = 0.5 |theta - c|^2: every gradient is elementwise."""
  rng = np.random.default_rng(seed)
  theta0, phi, target = rng.normal(size=size), rng.uniform(0.5, 1.5, size), rng.normal(size=size)
  inner = lambda theta, p: 0.5 * jnp.sum(p * theta**2)  # noqa: E731
  outer = lambda theta: 0.5 * jnp.sum((theta - target) ** 2)  # noqa: E731
  return theta0, phi, target, inner, outer


def numpy_trajectory(theta0, phi, target, inner_steps):
  """theta_n of momentum SGD on the quadratic (NumPy float64)."""
  theta, v, thetas = theta0.copy(), np.zeros_like(theta0), [theta0.copy()]
  for n in range(inner_steps + 1):
    grad = phi * theta if n < inner_steps else theta - target
    v = MU * v + grad + WD * theta
    theta = theta - LR * v
    thetas.append(theta)
  return thetas


def test_one_inner_step_matches_hand_derived_gradient():
  """theta1 = (1 - lr wd - lr phi) theta0;  theta2 = theta1 - lr (mu v1 + (1 + wd) theta1 - c),
  so d theta2 / d phi = -lr theta0 ((1 - lr (1 + wd)) + mu) and G = (theta2 - c) * that."""
  with jax.enable_x64(True):
    theta0, phi, target, inner, outer = quadratic_problem()
    _, _, theta2 = numpy_trajectory(theta0, phi, target, inner_steps=1)
    expected = (theta2 - target) * (-LR * theta0) * ((1 - LR * (1 + WD)) + MU)
    kw = dict(lr=LR, weight_decay=WD, momentum=MU, inner_steps=1)
    for mode in meta.MODES:  # with one inner step the authors' recursion is exact too
      got = meta.hypergradient(jnp.asarray(phi), jnp.asarray(theta0), inner, outer, mode=mode, **kw)
      np.testing.assert_allclose(got, expected, rtol=1e-12)
    unrolled = meta.unrolled_outer_loss(jnp.asarray(phi), jnp.asarray(theta0), inner, outer, **kw)
    np.testing.assert_allclose(unrolled, 0.5 * np.sum((theta2 - target) ** 2), rtol=1e-12)


def test_rolled_and_unrolled_trajectories_agree():
  with jax.enable_x64(True):
    theta0, phi, _, inner, outer = quadratic_problem(seed=2)
    kw = dict(lr=LR, weight_decay=WD, momentum=MU, inner_steps=3)
    grads = [
        meta.hypergradient(
            jnp.asarray(phi), jnp.asarray(theta0), inner, outer, unroll=u, remat=r, **kw
        )
        for u in (True, False)
        for r in (True, False)
    ]
    for g in grads[1:]:
      np.testing.assert_allclose(g, grads[0], rtol=1e-12)


def test_official_mode_differs_by_the_documented_amount():
  """inner_steps = 2: G_official - G_exact = (1 - wd) mu lr^2 J_1^T grad outer(theta_3), with
  J_1^T a = theta0 * a here; the recursion with coupling = wd is the exact gradient."""
  with jax.enable_x64(True):
    theta0, phi, target, inner, outer = quadratic_problem(seed=1)
    theta3 = numpy_trajectory(theta0, phi, target, inner_steps=2)[-1]
    kw = dict(lr=LR, weight_decay=WD, momentum=MU, inner_steps=2)
    args = (jnp.asarray(phi), jnp.asarray(theta0), inner, outer)
    exact = meta.hypergradient(*args, mode='exact', **kw)
    official = meta.hypergradient(*args, mode='official', **kw)
    np.testing.assert_allclose(
        official - exact, (1 - WD) * MU * LR**2 * theta0 * (theta3 - target), rtol=1e-10
    )
    assert np.max(np.abs(official - exact)) > 1e-3 * np.max(np.abs(exact))
    adjoint = meta._adjoint_hypergradient(*args, coupling=WD, **kw)  # pylint: disable=protected-access
    np.testing.assert_allclose(adjoint, exact, rtol=1e-10)


def dense_problem(seed=0, batch=6, in_dim=4, width=3, proj=2, classes=3):
  """A two-'peer' toy in the shape of L-MCL: features f_a, f_b of a shared input; per-sample
  weights sigmoid(cos(P_a f_a, P_b f_b)) (phi = P_a, P_b with biases) on a per-sample contrastive
  stand-in; outer = CE of both peers' linear classifiers."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, in_dim))
  y = rng.integers(0, classes, batch)
  theta = {
      'a': rng.normal(size=(in_dim, width)),
      'b': rng.normal(size=(in_dim, width)),
      'cls_a': rng.normal(size=(width, classes)),
      'cls_b': rng.normal(size=(width, classes)),
  }
  phi = {
      'pa': rng.normal(size=(width, proj)),
      'pb': rng.normal(size=(width, proj)),
      'bias': rng.normal(size=(2, proj)),
  }

  def features(t):
    return jnp.tanh(x @ t['a']), jnp.tanh(x @ t['b'])

  def inner(t, p):
    fa, fb = features(t)
    w = losses.layer_match_weights(
        jnp.stack([fa @ p['pa'] + p['bias'][0], fb @ p['pb'] + p['bias'][1]])[:, None]
    )  # [2, B]
    per_sample = jnp.sum((fa - fb) ** 2, axis=-1)
    return jnp.sum(w * per_sample[None])

  def outer(t):
    fa, fb = features(t)
    logits = jnp.stack([fa @ t['cls_a'], fb @ t['cls_b']])
    return losses.ce_loss(logits, y)

  return theta, phi, inner, outer


def test_hypergradient_matches_central_finite_differences():
  with jax.enable_x64(True):
    theta, phi, inner, outer = dense_problem()
    theta = jax.tree.map(jnp.asarray, theta)
    phi = jax.tree.map(jnp.asarray, phi)
    kw = dict(lr=LR, weight_decay=WD, momentum=MU, inner_steps=2)
    f = jax.jit(lambda p: meta.unrolled_outer_loss(p, theta, inner, outer, **kw))
    flat, unravel = jax.flatten_util.ravel_pytree(phi)
    eps = 1e-5
    fd = np.array(
        [
            (f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)
            for e in np.eye(flat.size)
        ]
    )
    assert np.max(np.abs(fd)) > 1e-4  # phi really moves the outer loss
    for second_order in meta.SECOND_ORDER:
      for remat in (True, False):
        got = jax.flatten_util.ravel_pytree(
            meta.hypergradient(
                phi, theta, inner, outer, remat=remat, second_order=second_order, **kw
            )
        )[0]
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-10)
      adjoint = meta._adjoint_hypergradient(
          phi,
          theta,
          inner,
          outer,
          coupling=WD,  # pylint: disable=protected-access
          second_order=second_order,
          **kw,
      )
      np.testing.assert_allclose(
          jax.flatten_util.ravel_pytree(adjoint)[0], fd, rtol=1e-6, atol=1e-10
      )


def test_reverse_over_forward_gradient_has_the_second_order_vjp_of_nested_grad():
  """meta.gradient_fn's custom VJP (H u, (d/dphi grad)^T u) equals jax.vjp of jax.grad, and its
  value is jax.grad's, on the L-MCL-shaped toy."""
  with jax.enable_x64(True):
    theta, phi, inner, _ = dense_problem(seed=4)
    theta = jax.tree.map(jnp.asarray, theta)
    phi = jax.tree.map(jnp.asarray, phi)
    u = jax.tree.map(lambda x: jnp.cos(3.0 * x), theta)
    fast = meta.gradient_fn(inner, 'reverse_over_forward')
    plain = meta.gradient_fn(inner, 'reverse_over_reverse')
    value_fast, vjp_fast = jax.vjp(fast, theta, phi)
    value_plain, vjp_plain = jax.vjp(plain, theta, phi)
    chex.assert_trees_all_close(value_fast, value_plain, rtol=1e-13, atol=0)
    chex.assert_trees_all_close(vjp_fast(u), vjp_plain(u), rtol=1e-11, atol=1e-14)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(vjp_plain(u)[1])) > 1e-3
    with pytest.raises(ValueError, match='second_order'):
      meta.gradient_fn(inner, 'forward_over_forward')


def test_second_order_rules_agree_under_jit_with_closed_over_arrays():
  """As in the meta step: losses close over the jit's float and integer arrays (a batch and its
  labels); both rules, both modes, with and without remat give one hyper-gradient."""
  with jax.enable_x64(True):

    def hypergradients(theta, labels, scale):
      inner = lambda th, p: jnp.sum(p * jnp.sin(th) ** 2 * scale * labels)  # noqa: E731
      outer = lambda th: jnp.sum((th - labels) ** 2 * scale)  # noqa: E731
      kw = dict(lr=LR, weight_decay=WD, momentum=MU, inner_steps=2)
      return [
          meta.hypergradient(
              jnp.linspace(0.5, 1.5, 4),
              theta,
              inner,
              outer,
              mode=mode,
              remat=remat,
              second_order=order,
              **kw,
          )
          for mode in meta.MODES
          for remat in (True, False)
          for order in meta.SECOND_ORDER
      ]

    got = jax.jit(hypergradients)(jnp.linspace(-1.0, 2.0, 4), jnp.arange(4), 1.5)
    for mode_index in range(2):
      block = got[4 * mode_index : 4 * mode_index + 4]
      assert np.max(np.abs(block[0])) > 1e-3
      for g in block[1:]:
        np.testing.assert_allclose(g, block[0], rtol=1e-12, atol=1e-15)


def test_per_leaf_weight_decay_matches_finite_differences_and_the_adjoint():
  """A weight-decay pytree (0 for spared leaves, as optim.wd_mask='no_bn_bias' gives the virtual
  steps) against central differences of the unrolled objective, the exact adjoint recursion and,
  when uniform, the scalar form."""
  with jax.enable_x64(True):
    theta, phi, inner, outer = dense_problem(seed=3)
    theta = jax.tree.map(jnp.asarray, theta)
    phi = jax.tree.map(jnp.asarray, phi)
    wd_tree = {'a': 0.2, 'b': 0.0, 'cls_a': 0.05, 'cls_b': 0.0}
    kw = dict(lr=LR, momentum=MU, inner_steps=2)
    f = jax.jit(
        lambda p: meta.unrolled_outer_loss(p, theta, inner, outer, weight_decay=wd_tree, **kw)
    )
    flat, unravel = jax.flatten_util.ravel_pytree(phi)
    eps = 1e-5
    fd = np.array(
        [
            (f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)
            for e in np.eye(flat.size)
        ]
    )
    got = meta.hypergradient(phi, theta, inner, outer, weight_decay=wd_tree, **kw)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got)[0], fd, rtol=1e-6, atol=1e-10)
    adjoint = meta._adjoint_hypergradient(
        phi,
        theta,
        inner,
        outer,
        weight_decay=wd_tree,  # pylint: disable=protected-access
        coupling=wd_tree,
        **kw,
    )
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(adjoint)[0], fd, rtol=1e-6, atol=1e-10)
    uniform = meta.hypergradient(
        phi, theta, inner, outer, weight_decay=jax.tree.map(lambda _: 0.2, wd_tree), **kw
    )
    scalar = meta.hypergradient(phi, theta, inner, outer, weight_decay=0.2, **kw)
    chex.assert_trees_all_close(uniform, scalar, rtol=1e-14, atol=0)
    # The spared leaves really change the answer (the test would pass for any wd otherwise).
    assert not np.allclose(jax.flatten_util.ravel_pytree(scalar)[0], fd, rtol=1e-3)
    # One virtual step moves a spared leaf by its gradient alone.
    grads = jax.tree.map(jnp.ones_like, theta)
    stepped, _ = meta.virtual_sgd_step(
        theta, jax.tree.map(jnp.zeros_like, theta), grads, lr=LR, weight_decay=wd_tree, momentum=MU
    )
    np.testing.assert_allclose(stepped['b'], theta['b'] - LR, rtol=1e-14)
    np.testing.assert_allclose(stepped['a'], theta['a'] - LR * (1 + 0.2 * theta['a']), rtol=1e-14)


def test_per_step_programs_equal_the_one_program():
  """meta.per_step_hypergradient (a jitted program per kind of step, driven from Python) gives the
  one-program hyper-gradient in both modes for 1-3 inner steps with per-leaf weight decay, and
  compiles each of its 6 programs once however many inner steps there are."""
  with jax.enable_x64(True):
    theta, phi, inner, outer = dense_problem(seed=5)
    theta = jax.tree.map(jnp.asarray, theta)
    phi = jax.tree.map(jnp.asarray, phi)
    wd_tree = {'a': 0.2, 'b': 0.0, 'cls_a': 0.05, 'cls_b': 0.0}
    traces = []

    def counting_jit(fn, **kwargs):
      def traced(*args):
        traces.append(fn.__qualname__)
        return fn(*args)

      return jax.jit(traced, **kwargs)

    problem_fn = lambda th, p, lr: meta.Problem(p, th, inner, outer, lr, wd_tree)  # noqa: E731
    for mode in meta.MODES:
      for inner_steps in (1, 2, 3):
        settings = meta.Settings(inner_steps=inner_steps, momentum=MU, mode=mode)
        expected = meta.hypergradient_of(problem_fn(theta, phi, LR), settings)
        assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(expected)) > 1e-3
        traces.clear()
        per_step = meta.per_step_hypergradient(problem_fn, settings, jit=counting_jit)
        for _ in range(2):
          got = per_step(theta, phi, jnp.asarray(LR))
          chex.assert_trees_all_close(got, expected, rtol=1e-10, atol=1e-14)
        assert len(traces) == 6, (mode, inner_steps, traces)
    with pytest.raises(ValueError, match='mode'):
      meta.per_step_hypergradient(problem_fn, meta.Settings(2, MU, mode='approx'))


def test_meta_program_auto_is_per_step_on_cpu_and_one_elsewhere():
  """`method.meta_program=auto`; that the two programs agree (and leave the rest of the state) is
  tested on a mesh and on one device in float64 by the next test."""
  for program in meta.PROGRAMS:
    method = train.Experiment(
        tiny_config(**{'method.name': 'lmcl', 'method.meta_program': program})
    ).method
    assert step_lib.meta_program(method) == program
  auto = train.Experiment(tiny_config(**{'method.name': 'lmcl'})).method
  assert step_lib.meta_program(auto, 'cpu') == 'per_step'
  assert step_lib.meta_program(auto, 'gpu') == 'one'


def test_meta_programs_on_a_mesh_equal_one_device(tmp_path):
  """Both meta programs on a (data 4, peer 2) mesh of 8 fake CPU devices (a subprocess,
  tests/support/meta_programs_sharded.py), from the same state, move phi as the per-step program
  on 1 device and as each other, leave the rest of the state and keep every leaf's placement."""
  out = str(tmp_path / 'results.json')
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'support', 'meta_programs_sharded.py'), out],
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      cwd=REPO,
      timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    results = json.load(f)
  assert [r['program'] for r in results] == list(meta.PROGRAMS)
  for r in results:
    assert r['devices'] == 8 and r['phi_moved_scale'] > 0, r
    # float32 heads and phi in the float64 model: the mesh's reordered sums (helper's docstring).
    assert r['relative_difference'] < 1e-3, r
    assert r['relative_difference_to_one_on_mesh'] < 1e-6, r
    assert r['rest_unchanged'] and r['placements_kept'], r


def test_meta_sgd_update_is_torch_nesterov():
  phi, grad = np.array([1.0, -2.0]), np.array([0.5, 0.25])
  state = meta.meta_optimizer(WD, MU).init(jnp.asarray(phi))
  buf = np.zeros(2)
  for lr in (0.1, 0.05):
    new_phi, state = meta.meta_sgd_update(
        jnp.asarray(phi), jnp.asarray(grad), state, lr, weight_decay=WD, momentum=MU
    )
    g = grad + WD * phi
    buf = MU * buf + g
    phi = phi - lr * (g + MU * buf)
    np.testing.assert_allclose(new_phi, phi, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- #
# The method on a heterogeneous cohort.
# ---------------------------------------------------------------------------------------------- #
def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(student, target, T):
  pt = np.exp(np_log_softmax(target / T))
  return T * T * np.sum(pt * (np.log(pt) - np_log_softmax(student / T))) / student.shape[0]


def np_dense(p, x):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def test_method_terms_match_references_on_heterogeneous_cohort():
  config = config_lib.base_config()
  config.model.archs, config.cohort.num_peers = ('resnet8', 'wrn_16_2'), 2
  config.method = methods.config('lmcl', embed_dim=16)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=4)
  method = methods.build(config.method)
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = np.arange(8) // 2
  peer_params, peer_stats = jax.jit(cohort.init)(jax.random.key(0), images[:1])
  params, state = jax.jit(lambda k: method.init(k, cohort, labels))(jax.random.key(2))
  outputs, _ = jax.jit(lambda p, s: cohort.apply(p, s, images, train=True))(peer_params, peer_stats)
  ctx = LossContext(rng=None, step=jnp.zeros((), jnp.int32), peer_params=peer_params, cohort=cohort)

  @jax.jit
  def method_outputs(params, state, outputs):
    stages, _ = method.stages(cohort, params['branches'], state['batch_stats'], outputs, train=True)
    return (
        method.loss(params, state, outputs, {'label': labels}, ctx),
        method.match_weights(state['phi'], stages),
    )

  (total, terms, new_state), method_weights = method_outputs(params, state, outputs)

  @jax.jit
  def reference_stages(params, state, outputs):
    """Stage features / logits `[K][S]`, peer by peer with plain flax apply."""
    feats, logits = [], []
    for g, group in enumerate(cohort.groups):
      out = jax.tree.map(lambda x: x[0], outputs['groups'][g])
      peer_feats, peer_logits = [], []
      for first in (1, 2):
        variables = {
            'params': jax.tree.map(lambda x: x[0], params['branches'][g][first - 1]),
            'batch_stats': jax.tree.map(lambda x: x[0], state['batch_stats'][g][first - 1]),
        }
        branch, _ = method.branch_model(group, first).apply(
            variables, out['stages'][first - 1], train=True, mutable=['batch_stats']
        )
        peer_feats.append(branch['feature'])
        peer_logits.append(branch['logits'])
      feats.append(peer_feats + [out['feature']])
      logits.append(peer_logits + [out['logits']])
    return feats, logits

  feats, logits = jax.tree.map(
      lambda x: np.asarray(x, np.float64), reference_stages(params, state, outputs)
  )
  K, S = 2, 3
  # Layer-matching weights in the documented order (i, j != i, s, t), NumPy
  # (docs/methods.md#l-mcl-layer-matching).
  proj = [
      [np_dense(jax.tree.map(lambda x: x[0, s], state['phi'][k]), feats[k][s]) for s in range(S)]
      for k in range(K)
  ]
  unit = [[p / np.linalg.norm(p, axis=-1, keepdims=True) for p in row] for row in proj]
  w = np.array(
      [
          1 / (1 + np.exp(-np.sum(unit[i][s] * unit[j][t], axis=-1)))
          for i in range(K)
          for j in range(K)
          if j != i
          for s in range(S)
          for t in range(S)
      ]
  )
  # Contrastive terms: loop over combinations of the per-pair function.
  emb = [
      [
          method.head.apply(
              {'params': jax.tree.map(lambda x: x[0, s], params['heads'][k])},
              jnp.asarray(feats[k][s], jnp.float32),
          )
          for s in range(S)
      ]
      for k in range(K)
  ]
  combos = [
      (i, j, s, t) for i in range(K) for j in range(K) if j != i for s in range(S) for t in range(S)
  ]
  pair_terms = jax.jit(losses.pair_mcl_terms, static_argnums=(4, 5))
  pair = np.sum(
      [
          np.asarray(
              pair_terms(emb[i][s], emb[j][t], labels, w[n], config.method.tau, config.method.kd_T)
          )
          for n, (i, j, s, t) in enumerate(combos)
      ],
      axis=0,
  )
  # CE of every stage, aggregator, KD, NumPy.
  ce = -sum(
      np.mean(np_log_softmax(logits[k][s])[np.arange(8), labels])
      for k in range(K)
      for s in range(S)
  )
  aggregated = []
  for k in range(K):
    p = jax.tree.map(lambda x: x[0], params['aggregator'][k])
    hidden = np.maximum(np_dense(p['fc1'], np.concatenate(feats[k], axis=-1)), 0)
    pi = np.exp(np_log_softmax(np_dense(p['fc2'], hidden)))
    aggregated.append(sum(pi[:, s, None] * logits[k][s] for s in range(S)))
  ce_agg = -sum(np.mean(np_log_softmax(a)[np.arange(8), labels]) for a in aggregated)
  kd = sum(
      np_kl(logits[i][-1], aggregated[j], config.method.kd_T) for i in range(K) for j in range(K)
  )

  c = config.method
  expected = dict(
      zip(('vcl', 'soft_vcl', 'icl', 'soft_icl'), pair),
      ce=ce,
      ce_agg=ce_agg,
      kd=kd,
      mean_w=w.mean(),
      w_range=np.ptp(w.mean(axis=1)),
  )
  assert set(terms) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-4, err_msg=name)
  np.testing.assert_allclose(
      total,
      ce + ce_agg + kd + c.alpha * pair[0] + c.gamma * pair[1] + c.beta * pair[2] + c.lam * pair[3],
      rtol=2e-4,
  )
  # The method's weights are the documented ones, and its branch BN statistics were updated.
  np.testing.assert_allclose(method_weights, w, rtol=1e-5)
  assert not np.allclose(
      jax.tree.leaves(new_state['batch_stats'])[0], jax.tree.leaves(state['batch_stats'])[0]
  )


def test_eval_classifiers_are_every_branch_and_the_aggregate_in_eval_mode():
  """`eval_classifiers` (the authors' L-MCL test: every stage's classifier and the aggregated
  logits) against per-peer flax applies in eval mode and a NumPy aggregator, and the eval step's
  counts of them against NumPy (masked padding)."""
  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers = 'resnet8', 2
  config.method = methods.config('lmcl', embed_dim=16)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=4)
  method = methods.build(config.method)
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
      'label': rng.integers(0, 4, 12).astype(np.int32),
      'mask': np.arange(12) < 9,
  }
  peer_params, peer_stats = jax.jit(cohort.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  params, state = jax.jit(lambda k: method.init(k, cohort, batch['label']))(jax.random.key(2))
  # Non-trivial running statistics, so that eval mode (running stats) differs from train mode.
  state['batch_stats'] = jax.tree.map(
      lambda x: x + jnp.asarray(rng.uniform(0.1, 0.5, x.shape), x.dtype), state['batch_stats']
  )
  aug = types.SimpleNamespace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
  images = (batch['image'] / 255.0 - np.array(aug.mean)) / np.array(aug.std)
  outputs, _ = jax.jit(lambda p, s: cohort.apply(p, s, jnp.asarray(images), train=False))(
      peer_params, peer_stats
  )
  scores = jax.jit(lambda p, s, o: method.eval_classifiers(p, s, o, cohort))(params, state, outputs)
  expected = {}
  for k in range(2):
    at_k = lambda tree, k=k: jax.tree.map(lambda x: x[k], tree)  # noqa: E731
    feats, logits = [], []
    for first in (1, 2):
      variables = {
          'params': at_k(params['branches'][0][first - 1]),
          'batch_stats': at_k(state['batch_stats'][0][first - 1]),
      }
      stage_map = jax.tree.map(lambda x: x[k], outputs['groups'][0]['stages'][first - 1])
      branch = method.branch_model(cohort.groups[0], first).apply(variables, stage_map, train=False)
      feats.append(np.asarray(branch['feature'], np.float64))
      logits.append(np.asarray(branch['logits'], np.float64))
      expected[f'peer_{k}_stage_{first - 1}'] = logits[-1]
    feats.append(np.asarray(outputs['groups'][0]['feature'][k], np.float64))
    logits.append(np.asarray(outputs['logits'][k], np.float64))
    p = at_k(params['aggregator'][0])
    hidden = np.maximum(np_dense(p['fc1'], np.concatenate(feats, axis=-1)), 0)
    pi = np.exp(np_log_softmax(np_dense(p['fc2'], hidden)))
    expected[f'peer_{k}_aggregated'] = sum(pi[:, s, None] * logits[s] for s in range(3))
  assert set(scores) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(scores[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  eval_step = jax.jit(step_lib.make_eval_step(cohort, aug, method))
  counts = eval_step(peer_params, peer_stats, batch, (params, state))
  for name, value in expected.items():
    correct = np.sum((np.argmax(value, axis=-1) == batch['label']) & batch['mask'])
    assert int(counts['classifiers'][name]) == correct, name
  # Without the method's variables the step counts the peers only, as for every other method.
  assert 'classifiers' not in jax.jit(step_lib.make_eval_step(cohort, aug))(
      peer_params, peer_stats, batch
  )


def test_unit_weights_recover_plain_pair_terms():
  """K = 2, S = 1 with w = 1: every unordered pair is counted twice, so the L-MCL totals are
  2x MCL's vcl / soft_vcl / icl / soft_icl."""
  rng = np.random.default_rng(3)
  emb = losses.l2_normalize(jnp.asarray(rng.normal(size=(2, 8, 5)), jnp.float32))
  labels = jnp.asarray(np.arange(8) // 2)
  tau, T = 0.1, 3.0
  got = losses.layer_mcl_loss(emb[:, None], labels, jnp.ones((2, 8)), tau, T)
  plain = (
      losses.vcl_loss(emb, labels, tau),
      losses.soft_vcl_loss(emb, tau, T),
      losses.icl_loss(emb, labels, tau),
      losses.soft_icl_loss(emb, tau, T),
  )
  np.testing.assert_allclose(got, 2 * np.asarray(plain), rtol=1e-5)


def lmcl_pieces(**overrides):
  """A ResNet-8 x 2 L-MCL cohort on 8 tiny images (4 classes x 2), the same parameters for
  every `overrides`; returns what the switch tests compare."""
  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers = 'resnet8', 2
  config.method = methods.config('lmcl', embed_dim=16, **overrides)
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=4)
  method = methods.build(config.method)
  images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  labels = jnp.asarray(np.arange(8) // 2)
  peer_params, peer_stats = jax.jit(cohort.init)(jax.random.key(0), images[:1])
  params, state = jax.jit(lambda k: method.init(k, cohort, np.asarray(labels)))(jax.random.key(2))
  ctx = LossContext(rng=None, step=jnp.zeros((), jnp.int32), peer_params=peer_params, cohort=cohort)
  train_state = types.SimpleNamespace(
      params={'peers': peer_params, 'method': params}, method_state=state, batch_stats=peer_stats
  )
  batch = {'image': images, 'label': labels}

  @jax.jit
  def run(params, state):
    outputs, _ = cohort.apply(peer_params, peer_stats, images, train=True)
    total, terms, _ = method.loss(params, state, outputs, batch, ctx)
    stages, _ = method.stages(cohort, params['branches'], state['batch_stats'], outputs, train=True)
    theta0, inner, outer = method.meta_objectives(train_state, batch, cohort)
    phi_grad = jax.grad(lambda phi: inner(theta0, phi))(state['phi'])
    return dict(
        total=total,
        terms=terms,
        logits=stages.logits,
        emb=method.embeddings(params['heads'], stages),
        phi_weights=method.match_weights(state['phi'], stages),
        inner=inner(theta0, state['phi']),
        outer=outer(theta0),
        phi_grad=phi_grad,
    )

  return method, run(params, state), labels


def test_lmcl_ablation_switches():
  """meta_learned_weights=False: every layer weight is 1, no meta step, no path to phi;
  stage_pairs='diagonal': only the s == t combinations (with phi's weights); branch_ce=False: the
  CE of the final stage only, in the step and in the meta step's outer objective. Everything
  else as the default method (docs/methods.md#l-mcl-ablation-switches)."""
  tau, T = 0.1, 3.0
  default, ref, labels = lmcl_pieces()
  emb, w = np.asarray(ref['emb'], np.float64), np.asarray(ref['phi_weights'], np.float64)
  K, S = emb.shape[:2]
  combos = [
      (i, j, s, t) for i in range(K) for j in range(K) if j != i for s in range(S) for t in range(S)
  ]

  def pair_sum(weight_of, keep=lambda s, t: True):
    pair_terms = jax.jit(losses.pair_mcl_terms, static_argnums=(4, 5))
    return np.sum(
        [
            np.asarray(pair_terms(emb[i, s], emb[j, t], labels, weight_of(n), tau, T))
            for n, (i, j, s, t) in enumerate(combos)
            if keep(s, t)
        ],
        axis=0,
    )

  def contrastive(terms):
    return 0.1 * terms[0] + 1.0 * terms[1] + 0.1 * terms[2] + 1.0 * terms[3]

  names = ('vcl', 'soft_vcl', 'icl', 'soft_icl')
  assert default.meta_every_steps == 50
  np.testing.assert_allclose([ref['terms'][n] for n in names], pair_sum(lambda n: w[n]), rtol=2e-4)
  np.testing.assert_allclose(ref['terms']['mean_w'], w.mean(), rtol=1e-6)
  np.testing.assert_allclose(ref['terms']['w_range'], np.ptp(w.mean(axis=1)), rtol=1e-5)
  assert 0.269 < w.min() and w.max() < 0.731
  np.testing.assert_allclose(ref['outer'], losses.ce_loss(ref['logits'], labels), rtol=1e-6)
  assert any(np.any(g != 0) for g in jax.tree.leaves(ref['phi_grad']))

  fixed, got, _ = lmcl_pieces(meta_learned_weights=False)
  assert fixed.meta_every_steps == 0  # the loop never runs a meta step
  expected = pair_sum(lambda n: np.ones(8))
  np.testing.assert_allclose([got['terms'][n] for n in names], expected, rtol=2e-4)
  np.testing.assert_allclose(got['terms']['mean_w'], 1.0)
  np.testing.assert_allclose(got['terms']['w_range'], 0.0)
  np.testing.assert_allclose(got['inner'], contrastive(expected), rtol=2e-4)
  assert all(np.all(g == 0) for g in jax.tree.leaves(got['phi_grad']))

  _, got, _ = lmcl_pieces(stage_pairs='diagonal')
  diagonal = lambda s, t: s == t  # noqa: E731
  expected = pair_sum(lambda n: w[n], diagonal)
  np.testing.assert_allclose([got['terms'][n] for n in names], expected, rtol=2e-4)
  on_diagonal = [n for n, (_, _, s, t) in enumerate(combos) if s == t]
  np.testing.assert_allclose(got['terms']['mean_w'], w[on_diagonal].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      got['terms']['w_range'], np.ptp(w[on_diagonal].mean(axis=1)), rtol=1e-5
  )
  np.testing.assert_allclose(got['inner'], contrastive(expected), rtol=2e-4)

  _, got, _ = lmcl_pieces(branch_ce=False)
  final_ce = losses.ce_loss(ref['logits'][:, -1:], labels)
  np.testing.assert_allclose(got['terms']['ce'], final_ce, rtol=1e-6)
  np.testing.assert_allclose(got['outer'], final_ce, rtol=1e-6)
  for name in names + ('ce_agg', 'kd', 'mean_w', 'w_range'):
    np.testing.assert_allclose(got['terms'][name], ref['terms'][name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(got['total'], ref['total'] - ref['terms']['ce'] + final_ce, rtol=1e-6)

  with pytest.raises(config_lib.ConfigError, match='stage_pairs'):
    methods.build(methods.config('lmcl', stage_pairs='upper'))


def test_lmcl_rejects_single_peer_and_multi_branch_models():
  """The method's own validation, run by train.validate before anything is built."""
  config = tiny_config(**{'method.name': 'lmcl', 'cohort.num_peers': 1})
  with pytest.raises(config_lib.ConfigError, match='lmcl needs >= 2 peers'):
    train.validate(config)
  config = tiny_config(**{'method.name': 'lmcl', 'model.arch': 'resnet8_okd2'})
  with pytest.raises(config_lib.ConfigError, match='single-branch'):
    train.validate(config)


def test_memory_bank_lmcl_terms_and_final_stage_update():
  """ImageNet L-MCL: the method's terms are memory_layer_mcl_loss of its embeddings and weights at
  the slots drawn by the step's key (own slot first), and only the batch's slots of every peer's
  memory move, by the momentum update with the FINAL-stage embeddings."""
  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers = 'resnet8', 2
  config.method = methods.config(
      'lmcl', embed_dim=8, memory_bank=True, num_positives=1, num_negatives=6, tau=0.07
  )
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=4)
  method = methods.build(config.method)
  assert not method.class_balanced
  train_labels = np.arange(40, dtype=np.int32) % 4
  batch = {
      'image': jax.random.normal(jax.random.key(1), (6, 8, 8, 3)),
      'index': jnp.asarray([3, 17, 22, 8, 31, 0], jnp.int32),
  }
  batch['label'] = jnp.asarray(train_labels[np.asarray(batch['index'])])
  peer_params, peer_stats = jax.jit(cohort.init)(jax.random.key(0), batch['image'][:1])
  params, state = jax.jit(lambda k: method.init(k, cohort, train_labels))(jax.random.key(2))
  assert state['memory'].shape == (2, 40, 8)
  ctx = LossContext(
      rng=jax.random.key(5), step=jnp.zeros((), jnp.int32), peer_params=peer_params, cohort=cohort
  )

  @jax.jit
  def run(params, state):
    outputs, _ = cohort.apply(peer_params, peer_stats, batch['image'], train=True)
    _, terms, new_state = method.loss(params, state, outputs, batch, ctx)
    stages, _ = method.stages(cohort, params['branches'], state['batch_stats'], outputs, train=True)
    emb = method.embeddings(params['heads'], stages)
    idx = method.contrast_indices(state, batch, ctx.rng)
    weights = method.match_weights(state['phi'], stages)
    expected = losses.memory_layer_mcl_loss(
        emb, state['memory'], idx, 1, weights, 0.07, config.method.kd_T
    )
    return terms, new_state['memory'], emb, idx, expected

  terms, memory, emb, idx, expected = run(params, state)
  np.testing.assert_array_equal(idx[:, 0], batch['index'])
  labels_idx = train_labels[np.asarray(idx)]
  assert np.all(labels_idx[:, 1] == np.asarray(batch['label']))
  assert np.all(labels_idx[:, 2:] != np.asarray(batch['label'])[:, None])
  for name, value in zip(('vcl', 'soft_vcl', 'icl', 'soft_icl'), expected):
    np.testing.assert_allclose(terms[name], value, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(
      memory, losses.memory_update(state['memory'], emb[:, -1], batch['index'], 0.5), atol=1e-6
  )
  untouched = np.setdiff1d(np.arange(40), np.asarray(batch['index']))
  np.testing.assert_array_equal(memory[:, untouched], np.asarray(state['memory'])[:, untouched])


# ---------------------------------------------------------------------------------------------- #
# Smoke run: the loop with the meta step.
# ---------------------------------------------------------------------------------------------- #
def test_smoke_training_run_with_meta_step(tmp_path):
  """The loop end to end with meta steps: the ImageNet variant (memory bank) under `vmap` on the
  tiny data (one run: the CIFAR variant's meta step is checked against finite differences, the
  one program and a mesh above). Memory and phi move, every logged value is finite, and the
  authors' metric is logged beside ours."""
  config = tiny_config(
      **{
          'method.name': 'lmcl',
          'method.meta_every_steps': 2,
          'method.memory_bank': True,
          'method.num_negatives': 16,
          'method.embed_dim': 16,
          'cohort.strategy': 'vmap',
          'total_steps': 4,
          'eval_every_steps': 4,
      }
  )
  workdir = str(tmp_path)
  result = train.run(config, workdir)
  assert 0 <= result['eval/best_peer/top1'] <= 1
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  # The authors' metric beside ours: every branch and aggregate, and the best of all classifiers.
  last = [r for r in rows if 'eval/best_peer/top1' in r][-1]
  classifiers = [
      last[f'eval/classifier/peer_{k}_{c}/top1']
      for k in (0, 1)
      for c in ('stage_0', 'stage_1', 'aggregated')
  ]
  best_peer = last['eval/best_peer/top1']
  assert last['eval/best_classifier/top1'] == max(classifiers + [best_peer])
  logged = {k: v for row in rows for k, v in row.items() if k.startswith('train/')}
  assert {'train/ce_agg', 'train/kd', 'train/vcl', 'train/soft_icl'} <= set(logged)
  assert all(np.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
  # The meta steps (after steps 0 and 2) moved phi; the memory bank moved.
  exp = train.Experiment(config)
  ckpt = ckpt_lib.Checkpointer(workdir, train.run_identity(config))
  state, _ = ckpt.restore_latest(exp.abstract_state_with_shardings())
  ckpt.close()
  initial = exp.init_state()
  for name in ('memory', 'phi'):
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        state.method_state[name],
        initial.method_state[name],
    )
    assert all(np.isfinite(m) and m > 0 for m in jax.tree.leaves(moved)), name
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.method_state))


def test_virtual_steps_follow_the_optimizers_weight_decay_mask(monkeypatch):
  """The trainer's meta step hands the virtual steps weight decay only where optim.wd_mask has
  the real optimizer decay (traced, not run: the meta machinery itself is tested above)."""
  seen = {}

  def capture(phi, theta0, *args, weight_decay, **kwargs):
    seen['theta0'], seen['wd'] = theta0, weight_decay
    return jax.tree.map(jnp.zeros_like, phi)

  class Captured(Exception):
    """Stops the per-step round once its problem is seen (its programs are not traced)."""

  def capture_per_step(problem_fn, settings, jit):
    del settings, jit

    def hypergradient(*args):
      problem = problem_fn(*args)
      capture(problem.phi, problem.theta0, weight_decay=problem.weight_decay)
      raise Captured

    return hypergradient

  monkeypatch.setattr(meta, 'hypergradient', capture)
  monkeypatch.setattr(meta, 'per_step_hypergradient', capture_per_step)
  for mask, program in (('all', 'one'), ('no_bn_bias', 'one'), ('no_bn_bias', 'per_step')):
    seen.clear()
    exp = train.Experiment(
        tiny_config(
            **{'method.name': 'lmcl', 'optim.wd_mask': mask, 'method.meta_program': program}
        )
    )
    try:
      jax.eval_shape(exp.meta_step, exp.abstract_state, exp.batch(0), exp.frozen)
    except Captured:
      assert program == 'per_step'
    wd = exp.config.method.meta_weight_decay
    flat = jax.tree_util.tree_flatten_with_path(seen['wd'])[0]
    assert len(flat) == len(jax.tree.leaves(seen['theta0']))
    for path, value in flat:
      spared = mask == 'no_bn_bias' and path[-1].key in ('bias', 'scale')
      assert value == (0.0 if spared else wd), (mask, jax.tree_util.keystr(path))
    assert any(path[-1].key == 'scale' for path, _ in flat)  # BN scales are in theta


@pytest.mark.parametrize(
    'arch', ['resnet32', 'wrn_16_2', 'shufflenetv2_1_0', 'vgg8', 'mobilenetv2', 'resnet18']
)
def test_lmcl_builds_branches_for_every_model_family(arch):
  """Abstract init (no compute): auxiliary branches, heads, aggregators and phi for K = 2."""
  config = config_lib.base_config()
  config.model.arch, config.cohort.num_peers = arch, 2
  config.method = methods.config('lmcl')
  cohort = cohort_lib.build_cohort(config.model, config.cohort, num_classes=10)
  params, state = jax.eval_shape(
      lambda k: methods.build(config.method).init(k, cohort, np.zeros(10, np.int32)),
      jax.random.key(0),
  )
  num_stages = cohort.groups[0].model.num_stages
  assert len(params['branches'][0]) == num_stages - 1
  assert jax.tree.leaves(state['phi'])[0].shape[:2] == (2, num_stages)
