"""The README's first-run figures are the ones docs/readme_figures.py last measured (and wrote)."""

import json
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "docs"))
import readme_figures  # noqa: E402


def test_readme_figures_match_their_measurement():
  figures = json.load(open(readme_figures.JSON))
  assert set(figures) == set(readme_figures.FIGURES)
  readme = open(os.path.join(REPO, "README.md")).read()
  assert readme_figures.mismatches(readme, figures) == []


def test_update_writes_what_mismatches_checks():
  readme = open(os.path.join(REPO, "README.md")).read()
  figures = json.load(open(readme_figures.JSON))
  changed = {**figures, "default_top1": 0.5, "ft_top1": 0.25, "random_fewshot": {"1": 0.1, "5": 0.2, "10": 0.3,
                                                                                  "25": 0.4}}
  assert len(readme_figures.mismatches(readme, changed)) == 3
  assert readme_figures.mismatches(readme_figures.update(readme, changed), changed) == []
