"""The documentation stands alone: every relative link in the repository's markdown resolves (file
and section anchor), code points readers only at files a clone has, and no file refers to
material outside the repository."""

import glob
import os
import re

import pytest

from support import REPO

MARKDOWN = sorted(
    p
    for p in glob.glob(os.path.join(REPO, '**', '*.md'), recursive=True)
    if '.venv' not in p and 'workdirs' not in p and '.pytest_cache' not in p
)
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
DOC_REF = re.compile(r'\b((?:docs|benchmarks/results)/[\w./-]+\.md)(#[\w-]+)?')


def anchors(path: str) -> set[str]:
  """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-'."""
  with open(path) as f:
    text = re.sub(r'```.*?```', '', f.read(), flags=re.S)
  found = set()
  for heading in re.findall(r'^#+\s+(.*)$', text, flags=re.M):
    slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
    found.add(slug)
  return found


def check(target: str, source: str) -> str | None:
  path, _, anchor = target.partition('#')
  full = os.path.normpath(os.path.join(os.path.dirname(source), path)) if path else source
  if not os.path.exists(full):
    return f'{os.path.relpath(source, REPO)}: {target} does not exist'
  if anchor and full.endswith('.md') and anchor not in anchors(full):
    return f'{os.path.relpath(source, REPO)}: no section #{anchor} in {os.path.relpath(full, REPO)}'
  return None


@pytest.mark.parametrize('path', MARKDOWN, ids=lambda p: os.path.relpath(p, REPO))
def test_markdown_links_resolve(path):
  with open(path) as f:
    text = f.read()
  bad = [
      problem
      for target in LINK.findall(text)
      if not re.match(r'[a-z]+://|mailto:', target)
      for problem in [check(target, path)]
      if problem
  ]
  assert not bad, '\n'.join(bad)


def source_files():
  for folder in ('mcl_jax', 'configs', 'tests', 'benchmarks', 'scripts', 'launch', 'examples'):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        if name.endswith(('.py', '.sh', '.md')):
          yield os.path.join(root, name)


def test_code_cites_only_documents_the_repository_has():
  bad = []
  for path in list(source_files()) + [os.path.join(REPO, 'README.md')]:
    if os.path.abspath(path) == os.path.abspath(__file__):  # its own negative examples
      continue
    with open(path) as f:
      text = f.read()
    for doc, anchor in DOC_REF.findall(text):
      problem = check(doc + (anchor or ''), os.path.join(REPO, 'README.md'))
      if problem:
        bad.append(f'{os.path.relpath(path, REPO)} cites {doc}{anchor}: {problem}')
  assert not bad, '\n'.join(bad)


def test_nothing_refers_outside_the_repository():
  # Built from pieces so that this file does not match its own pattern (a grep of the tree for
  # references outside the repository stays empty).
  outside, specs = r'\.\./' + 'shared', 'shared/' + 'specs'
  pattern = re.compile(outside + '|' + specs + r'|specs/[\w-]+\.md')
  bad = []
  for path in list(source_files()) + MARKDOWN:
    if os.path.abspath(path) == os.path.abspath(__file__):
      continue
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if pattern.search(line):
          bad.append(f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}')
  assert not bad, '\n'.join(bad)


def test_the_checks_catch_a_missing_file_and_section():
  readme = os.path.join(REPO, 'README.md')
  assert check('docs/methods.md', readme) is None
  assert 'does not exist' in check('docs/nope.md', readme)
  assert 'no section #no-such-section' in check('docs/methods.md#no-such-section', readme)
  assert DOC_REF.findall('see docs/methods.md#mcl.') == [('docs/methods.md', '#mcl')]
