"""Training curves: `python -m mcl_jax.plot WORKDIR [WORKDIR ...] --out curves.png`.

One panel with the test accuracy of every peer (thin) and of the ensemble (thick), then one panel
per loss term (`train/loss`, `train/ce`, `train/<term>`), each over steps and read from the runs'
`metrics.jsonl`; several runs are overlaid, one colour per run. `train.run` writes
`<workdir>/curves.png` this way when a run finishes.
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
NOT_LOSSES = ('train/lr',) + TIMING_METRICS


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[name]) for r in records if name in r]
  return [s for s, _ in points], [v for _, v in points]


def _accuracy_names(names) -> list[str]:
  peers = sorted(
      (n for n in names if n.startswith('eval/peer_') and n.endswith('/top1')),
      key=lambda n: int(n.split('/')[1][len('peer_') :]),
  )
  return peers + ['eval/ensemble/top1'] * ('eval/ensemble/top1' in names)


def _run_labels(workdirs) -> list[str]:
  """The directory names, or the full paths when two runs share a name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def make_figure(workdirs):
  """A matplotlib Figure of the runs in `workdirs`: panels ACCURACY_PANEL and one per loss term.
  WorkdirError for a directory that is not a run or has logged nothing yet."""
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
  losses = sorted(
      (n for n in names if n.startswith('train/') and n not in NOT_LOSSES),
      key=lambda n: (n != 'train/loss', n != 'train/ce', n),
  )
  panels = [ACCURACY_PANEL] + losses
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(5 * cols, 3.5 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat[len(panels) :]:
    ax.remove()
  colors = itertools.cycle(matplotlib.rcParams['axes.prop_cycle'].by_key()['color'])
  for color, label, records in zip(colors, _run_labels(workdirs), runs):
    ax = axes.flat[0]
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
    for ax, name in zip(axes.flat[1:], losses):
      ax.plot(*_series(records, name), color=color, label=label)
  for ax, title in zip(axes.flat, panels):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='x-small')
  fig.tight_layout()
  return fig


def plot_runs(workdirs, out: str) -> str:
  """Writes the curves of `workdirs` to the image file `out` (format from its extension)."""
  figure = make_figure(workdirs)
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):
    raise ValueError(f'--out {out}: the directory {out_dir} does not exist; create it first.')
  figure.savefig(out, dpi=100)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', help='run directories (holding metrics.jsonl)')
  parser.add_argument('--out', default='curves.png', help='image file to write (.png, .pdf, .svg)')
  args = parser.parse_args(argv)
  with cli.user_errors('mcl_jax.plot', workdir_lib.WorkdirError, OSError, ValueError):
    print(plot_runs(args.workdirs, args.out))


if __name__ == '__main__':
  main()
