"""README.md and docs/*.md hold together: local links resolve, every documented command is run by
tests/readme_test.py or says why not, and the README shows the commands that CI and a new user run."""

import glob
import os
import re

from tests.conftest import REPO
from tests.readme_test import COMMANDS, NOT_RUN, documented_commands

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def _prose(page: str) -> str:
  """The page without its fenced code blocks (whose brackets are not links)."""
  return re.sub(r"```.*?```", "", open(os.path.join(REPO, page)).read(), flags=re.S)


def _anchors(page: str) -> set[str]:
  """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces as hyphens."""
  headings = re.findall(r"^#+ (.+)$", _prose(page), re.M)
  return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_documented_command_is_run_or_says_why_not():
  documented = documented_commands()
  assert not set(COMMANDS) & set(NOT_RUN)
  listed = set(COMMANDS) | set(NOT_RUN)
  assert set(documented) == listed, (
      f"documented, in neither COMMANDS nor NOT_RUN of tests/readme_test.py: "
      f"{ {c: documented[c] for c in sorted(set(documented) - listed)} }; "
      f"listed, documented nowhere: {sorted(listed - set(documented))}")


def test_local_links_and_their_anchors_resolve():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
      if re.match(r"[a-z]+:", target):  # https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
      if not os.path.exists(resolved):
        broken.append(f"{page}: {target} (no such file)")
      elif anchor and resolved.endswith(".md") and anchor not in _anchors(os.path.relpath(resolved, REPO)):
        broken.append(f"{page}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
  readme = _prose("README.md")
  assert [page for page in PAGES[1:] if f"]({page})" not in readme] == []


def test_the_readme_is_a_front_door_with_the_commands_ci_and_a_new_user_run():
  readme = open(os.path.join(REPO, "README.md")).read()
  assert len(readme.splitlines()) <= 220
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  test_command = [line for line in ci.splitlines() if line.startswith("python -m pytest")]
  assert len(test_command) == 1, ci
  for command in ("pip install -r requirements.txt && python train.py", "bash .ci/run", test_command[0]):
    assert f"{command}\n" in blocks, f"README.md shows no bash block with exactly: {command}"
