"""Training curves: `python -m mcl_jax.plot WORKDIR [WORKDIR ...] --out curves.png`.

Panels, each over steps and read from the runs' `metrics.jsonl`, several runs overlaid with one
colour per run (`--panels` picks and orders them; default `accuracy,gap,losses`):
- `accuracy`: the test accuracy of every peer (thin) and of the ensemble (thick);
- `mean_accuracy`: the peers' mean test accuracy, one line per run (for comparing many runs);
- `gap`: the peers' mean training-set accuracy minus their mean test accuracy, in points, where a
  run evaluates on its training images (`train_eval/*`, e.g. `configs/fashion_mnist_small.py`);
  left out by the default when no run has it;
- `losses`: one panel per loss term (`train/loss`, `train/ce`, `train/<term>`).
`train.run` writes `<workdir>/curves.png` this way, with the default panels, when a run finishes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

import matplotlib
from matplotlib.figure import Figure  # not pyplot: no display, no global figure state

from mcl_jax import cli, workdir as workdir_lib
from mcl_jax.metrics import TIMING_METRICS, read_metrics

ACCURACY_PANEL = 'test top-1 accuracy'
MEAN_ACCURACY_PANEL = 'test top-1 accuracy, mean peer'
GAP_PANEL = 'train - test top-1, mean peer (points)'
PANELS = ('accuracy', 'mean_accuracy', 'gap', 'losses')
DEFAULT_PANELS = ('accuracy', 'gap', 'losses')
NOT_LOSSES = ('train/lr',) + TIMING_METRICS


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[name]) for r in records if name in r]
  return [s for s, _ in points], [v for _, v in points]


def _peer_names(names, prefix: str = 'eval') -> list[str]:
  """`<prefix>/peer_<i>/top1` of every peer in `names`, by peer index."""
  return sorted(
      (n for n in names if n.startswith(f'{prefix}/peer_') and n.endswith('/top1')),
      key=lambda n: int(n.split('/')[1][len('peer_') :]),
  )


def _accuracy_names(names) -> list[str]:
  return _peer_names(names) + ['eval/ensemble/top1'] * ('eval/ensemble/top1' in names)


def _mean_peer(records: list[dict], prefix: str) -> dict[int, float]:
  """{step: mean top-1 over the peers} of the records that log every peer under `prefix`."""
  out = {}
  for r in records:
    peers = _peer_names(r, prefix)
    if peers:
      out[r['step']] = sum(r[n] for n in peers) / len(peers)
  return out


def _mean_accuracy_series(records: list[dict]) -> tuple[list[int], list[float]]:
  test = _mean_peer(records, 'eval')
  return list(test), list(test.values())


def _gap_series(records: list[dict]) -> tuple[list[int], list[float]]:
  """Mean-peer training-set minus test accuracy in points, at the steps that log both."""
  test, train = _mean_peer(records, 'eval'), _mean_peer(records, 'train_eval')
  steps = [s for s in test if s in train]
  return steps, [100 * (train[s] - test[s]) for s in steps]


def _check_panel_names(panels) -> None:
  unknown = [p for p in panels if p not in PANELS]
  if unknown or not panels:
    raise ValueError(
        f'--panels {",".join(panels)}: unknown or empty; choose from {", ".join(PANELS)} '
        f'(comma-separated, e.g. --panels mean_accuracy,gap).'
    )


def _panels(panels, names) -> list[str]:
  """The titles of the requested `panels` (names from PANELS) for metrics `names`."""
  has_train_eval = bool(_peer_names(names, 'train_eval'))
  if 'gap' in panels and not has_train_eval and tuple(panels) != DEFAULT_PANELS:
    raise ValueError(
        '--panels gap: no run logs accuracy on its training images (train_eval/peer_*/top1); '
        'set data.train_eval_examples (e.g. -1 for the whole training set) when training.'
    )
  titles = []
  for panel in panels:
    if panel == 'accuracy':
      titles.append(ACCURACY_PANEL)
    elif panel == 'mean_accuracy':
      titles.append(MEAN_ACCURACY_PANEL)
    elif panel == 'gap' and has_train_eval:
      titles.append(GAP_PANEL)
    elif panel == 'losses':
      titles.extend(
          sorted(
              (n for n in names if n.startswith('train/') and n not in NOT_LOSSES),
              key=lambda n: (n != 'train/loss', n != 'train/ce', n),
          )
      )
  return titles


def _run_labels(workdirs) -> list[str]:
  """The directory names, or the full paths when two runs share a name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def make_figure(workdirs, panels=DEFAULT_PANELS):
  """A matplotlib Figure of the runs in `workdirs` with `panels` (names from PANELS, in order).
  WorkdirError for a directory that is not a run or has logged nothing yet; ValueError for an
  unknown panel, or `gap` asked for explicitly when no run logs training-set accuracy."""
  _check_panel_names(panels)
  runs = []
  for w in workdirs:
    workdir_lib.require(w, 'metrics.jsonl')
    runs.append(read_metrics(w))
    if not runs[-1]:
      raise workdir_lib.WorkdirError(
          f'{w} has logged no metrics yet (metrics.jsonl is empty): nothing to plot. Train '
          f'past the first log step (log_every_steps) first.'
      )
  names = set().union(*(r for records in runs for r in records))
  titles = _panels(panels, names)
  cols = min(3, len(titles))
  rows = math.ceil(len(titles) / cols)
  fig = Figure(figsize=(5 * cols, 3.5 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[len(titles) :]:
    ax.remove()
  colors = itertools.cycle(matplotlib.rcParams['axes.prop_cycle'].by_key()['color'])
  for color, label, records in zip(colors, _run_labels(workdirs), runs):
    for ax, title in zip(axes.flat, titles):
      if title == ACCURACY_PANEL:
        for name, style in zip(_accuracy_names(names), itertools.cycle(('--', ':', '-.'))):
          ensemble = name == 'eval/ensemble/top1'
          ax.plot(
              *_series(records, name),
              color=color,
              marker='.',
              lw=2.5 if ensemble else 1,
              ls='-' if ensemble else style,
              label=f'{label} {name.split("/")[1]}',
          )
      elif title == MEAN_ACCURACY_PANEL:
        ax.plot(*_mean_accuracy_series(records), color=color, marker='.', label=label)
      elif title == GAP_PANEL:
        ax.plot(*_gap_series(records), color=color, marker='.', label=label)
      else:
        ax.plot(*_series(records, title), color=color, label=label)
  for ax, title in zip(axes.flat, titles):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='x-small')
  fig.tight_layout()
  return fig


def plot_runs(workdirs, out: str, panels=DEFAULT_PANELS) -> str:
  """Writes the curves of `workdirs` to the image file `out` (format from its extension)."""
  figure = make_figure(workdirs, panels)
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise ValueError(f'--out {out}: the directory {out_dir} does not exist; create it first.')
  figure.savefig(out, dpi=100)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='run directories (holding metrics.jsonl)')
  parser.add_argument('--out', default='curves.png', help='image file to write (.png, .pdf, .svg)')
  parser.add_argument(
      '--panels',
      default=','.join(DEFAULT_PANELS),
      help=f'comma-separated panels, in order, from {", ".join(PANELS)}',
  )
  args = parser.parse_args(argv)
  with cli.user_errors('mcl_jax.plot', workdir_lib.WorkdirError, OSError, ValueError):
    print(plot_runs(args.workdirs, args.out, tuple(args.panels.split(','))))


if __name__ == '__main__':
  main()
