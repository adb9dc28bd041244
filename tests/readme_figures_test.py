"""The first-run figures in README.md and docs/evaluation.md are the ones docs/readme_figures.py last measured
(and wrote)."""

import json
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "docs"))
import readme_figures  # noqa: E402


def test_readme_figures_match_their_measurement():
  figures = json.load(open(readme_figures.JSON))
  assert set(figures) == set(readme_figures.FIGURES) | set(readme_figures.RECORDED_ONLY)
  assert readme_figures.mismatches(readme_figures.read_pages(), figures) == []


def test_the_machine_is_named_in_every_page_with_figures_and_no_date_is():
  pages = readme_figures.read_pages()
  figures = json.load(open(readme_figures.JSON))
  for page, text in pages.items():
    assert f"on {figures['machine']}" in text, page
    assert figures["date"] not in text, page


def test_update_writes_what_mismatches_checks():
  pages = readme_figures.read_pages()
  figures = json.load(open(readme_figures.JSON))
  changed = {**figures, "default_top1": 0.5, "ft_top1": 0.25, "machine": "a 3-core host, jax 9.9.9",
             "random_fewshot": {"1": 0.1, "5": 0.2, "10": 0.3, "25": 0.4}}
  # The README shows default_top1, ft_top1 and the machine; docs/evaluation.md the machine and random_fewshot.
  assert len(readme_figures.mismatches(pages, changed)) == 5
  updated = {page: readme_figures.update(text, changed) for page, text in pages.items()}
  assert readme_figures.mismatches(updated, changed) == []
  assert all("a 3-core host, jax 9.9.9" in updated[page] for page in ("README.md", "docs/evaluation.md"))


def test_a_figure_that_no_page_shows_is_a_mismatch():
  pages = {"README.md": "nothing measured here"}
  figures = json.load(open(readme_figures.JSON))
  assert len(readme_figures.mismatches(pages, figures)) == len(readme_figures.FIGURES)
