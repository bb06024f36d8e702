"""The layering README's "Architecture" section describes: imports point one way, from the entry
points down to the infrastructure. Every import of every module of mcl_jax (module-level and
inside functions) is checked; a module may import its own layer or those below it."""

import ast
import os

import pytest

from support import REPO

# Lowest first; a module is matched by its longest listed prefix.
LAYERS = (
    (
        'infrastructure',
        (
            'mcl_jax.registry',
            'mcl_jax.config_lib',
            'mcl_jax.data',
            'mcl_jax.sharding',
            'mcl_jax.checkpoint',
            'mcl_jax.workdir',
            'mcl_jax.metrics',
            'mcl_jax.optim',
            'mcl_jax.augment',
            'mcl_jax.contrastive_augment',  # MoCo's views (self-supervised MCL)
            'mcl_jax.cli',  # the one error path of every command
            'mcl_jax.host_malloc',  # huge-page host malloc for CPU runs (main re-executes)
            'mcl_jax.compile_cache',  # the persistent XLA compilation cache of the commands
            'mcl_jax.plot',  # curves from metrics.jsonl (the loop draws curves.png at the end)
            'mcl_jax.kernels',  # native CPU convolutions behind custom VJPs (the train step)
        ),
    ),
    ('models and losses', ('mcl_jax.models', 'mcl_jax.losses', 'mcl_jax.heads')),
    ('cohort and methods', ('mcl_jax.cohort', 'mcl_jax.methods', 'mcl_jax.meta', 'mcl_jax.step')),
    ('loop', ('mcl_jax.train', 'mcl_jax.plugins', 'mcl_jax.autotune')),
    (
        'entry points',
        (
            'mcl_jax.main',
            'mcl_jax.evaluate',
            'mcl_jax.export',
            'mcl_jax.report',
            'mcl_jax.linear_eval',
            'mcl_jax.rows',
        ),
    ),
)
PACKAGE_DIR = os.path.join(REPO, 'mcl_jax')


def layer_of(module: str) -> int | None:
  best = None
  for level, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + '.'):
        if best is None or len(prefix) > best[1]:
          best = (level, len(prefix))
  return None if best is None else best[0]


def package_modules():
  for root, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        yield rel[: -len('.__init__')] if rel.endswith('.__init__') else rel, path


def imported_modules(module: str, path: str):
  """(line, imported mcl_jax module) of every import statement in the file."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      for alias in node.names:  # `from mcl_jax import train` imports the module mcl_jax.train
        yield node.lineno, f'{base}.{alias.name}' if layer_of(f'{base}.{alias.name}') else base


MODULES = sorted(package_modules())


def test_every_module_has_a_layer():
  unplaced = [m for m, _ in MODULES if m != 'mcl_jax' and layer_of(m) is None]
  assert not unplaced, f'place these modules in a layer (here and in README): {unplaced}'


@pytest.mark.parametrize('module,path', MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module, path):
  own = layer_of(module)
  if own is None:  # the package's __init__
    return
  upward = []
  for line, imported in imported_modules(module, path):
    level = layer_of(imported)
    if level is not None and level > own:
      upward.append(f'{path}:{line} imports {imported} ({LAYERS[level][0]})')
  assert not upward, f'{module} ({LAYERS[own][0]}) imports upward:\n' + '\n'.join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from mcl_jax import train\n')
  found = [m for _, m in imported_modules('mcl_jax.methods.bad', str(bad))]
  assert found == ['mcl_jax.train'] and layer_of('mcl_jax.train') > layer_of('mcl_jax.methods')
