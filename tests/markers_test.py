"""Every test says what it needs: a static scan of tests/*.py for the markers registered in pyproject.toml.

A test that trains (calls train_and_evaluate, in process or in the code it runs in a subprocess), starts a python
process, simulates several devices, compiles for a TPU slice or runs timm/torch must carry the matching marker,
through its own code, the helpers it calls and the fixtures it uses. tests/conftest.py derives `slow` and `unit`
from these markers, so `-m unit` stays the fast tier only if this holds.
"""

import ast
import glob
import os
import re
import tomllib

from tests.conftest import HEAVY_MARKERS, REPO

BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def _registered() -> set[str]:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    lines = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
  return {line.split(":")[0].strip() for line in lines}


def _mark_names(node: ast.AST) -> list[str]:
  """X of every `pytest.mark.X` in the expression (a decorator, or pytestmark's value)."""
  return [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
          and n.value.attr == "mark"]


def _from_text(text: str) -> set[str]:
  """What code run from a string needs (a `python -c` program, a command line)."""
  needs = set()
  if "train_and_evaluate(" in text:
    needs.add("trains")
  if re.search(r"compile_for\(|--compile_for=\w", text):
    needs.add("tpu_compile")
  if re.search(r"\b(import|from) (timm|torch)\b|\btimm\.create_model", text):
    needs.add("peer")
  return needs


class _Module:
  """One test file's functions, fixtures, string constants and markers."""

  def __init__(self, path: str):
    self.path = path
    self.tree = ast.parse(open(path).read(), path)
    self.functions: dict[str, ast.FunctionDef] = {}
    self.fixtures: set[str] = set()
    self.autouse: set[str] = set()
    self.strings: dict[str, str] = {}
    self.module_marks: list[str] = []
    for node in self.tree.body:
      if isinstance(node, ast.FunctionDef):
        self.functions[node.name] = node
        for decorator in node.decorator_list:
          if "fixture" in ast.unparse(decorator):
            self.fixtures.add(node.name)
            if "autouse=True" in ast.unparse(decorator):
              self.autouse.add(node.name)
      elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        name = node.targets[0].id
        if name == "pytestmark":
          self.module_marks = _mark_names(node.value)
        texts = [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if texts:
          self.strings[name] = "\n".join(texts)

  def marks(self, function: ast.FunctionDef) -> set[str]:
    return set(self.module_marks) | {m for d in function.decorator_list for m in _mark_names(d)}


def _direct_needs(function: ast.FunctionDef, module: _Module) -> set[str]:
  needs = set()
  for node in ast.walk(function):
    if isinstance(node, ast.Call):
      name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
      if name == "train_and_evaluate":
        needs.add("trains")
      if name == "run_python":
        needs.add("subprocess")
      if name == "compile_for":
        needs.add("tpu_compile")
      for keyword in node.keywords:  # run_python(..., devices=8), or a helper that passes it on
        if keyword.arg == "devices" and isinstance(keyword.value, ast.Constant) and keyword.value.value != 1:
          needs.add("multidevice")
    elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.executable":
      needs.add("subprocess")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      needs |= _from_text(node.value)
    elif isinstance(node, ast.Name) and node.id in module.strings:
      needs |= _from_text(module.strings[node.id])
  return needs


def _needs(name: str, module: _Module, conftest: _Module, seen: frozenset = frozenset()) -> set[str]:
  """What a function needs: its own code, the test-file or conftest functions it calls, the fixtures it takes."""
  owner = module if name in module.functions else conftest
  function = owner.functions[name]
  needs = _direct_needs(function, owner)
  called = {n.func.id for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
  arguments = {a.arg for a in function.args.args}
  fixtures = {a for a in arguments if a in module.fixtures or a in conftest.fixtures}
  if name.startswith("test_"):
    fixtures |= module.autouse
  for other in (called | fixtures) - seen - {name}:
    if other in module.functions or other in conftest.functions:
      needs |= _needs(other, module, conftest, seen | {name})
  return needs


def _modules() -> list[_Module]:
  """The test files, less this one (whose strings are examples for the scan)."""
  return [_Module(p) for p in sorted(glob.glob(os.path.join(REPO, "tests", "*.py"))) if p != os.path.abspath(__file__)]


def test_every_marker_used_is_registered():
  registered = _registered()
  assert {"unit", "slow", *HEAVY_MARKERS} <= registered
  unregistered = {f"{os.path.basename(m.path)}: {mark}" for m in _modules()
                  for node in ast.walk(m.tree) for mark in _mark_names(node) if mark not in registered | BUILTIN}
  assert not unregistered, sorted(unregistered)


def test_slow_is_derived_not_written():
  written = {os.path.basename(m.path) for m in _modules() for node in ast.walk(m.tree) if "slow" in _mark_names(node)}
  assert not written, f"{sorted(written)} mark tests slow; mark what they need instead (pyproject.toml's markers)"


def test_tests_that_train_or_start_processes_carry_the_matching_markers():
  modules = _modules()
  conftest = next(m for m in modules if m.path.endswith("conftest.py"))
  missing = []
  for module in modules:
    for name, function in module.functions.items():
      if not name.startswith("test_"):
        continue
      marks = module.marks(function)
      needs = _needs(name, module, conftest)
      if "unit" in marks:  # declared cheap: calls train_and_evaluate only to see it refuse before training
        assert not marks & set(HEAVY_MARKERS), f"{module.path}::{name} is marked unit and {marks}"
        needs.discard("trains")
      if needs - marks:
        missing.append(f"{os.path.basename(module.path)}::{name} needs {sorted(needs - marks)}")
  assert not missing, "\n".join(missing)


def test_the_scan_sees_training_and_processes_through_helpers_and_fixtures(tmp_path):
  source = '''
import pytest, sys, subprocess
_CODE = "history = train_lib.train_and_evaluate(config, workdir)"
def helper(n):
  return run_python(_CODE, devices=n)
@pytest.fixture
def trained():
  train_lib.train_and_evaluate(config, "w")
def test_fixture(trained):
  pass
def test_helper():
  helper(8)
def test_compile():
  tpu.compile_for(config, "v5e:2x2")
def test_mentions():
  """--compile_for on a folder; torch beside TF crashes."""
@pytest.mark.subprocess
def test_process():
  subprocess.run([sys.executable, "-c", "import torch"])
'''
  path = tmp_path / "example_test.py"
  path.write_text(source)
  module, conftest = _Module(str(path)), _Module(os.path.join(REPO, "tests", "conftest.py"))
  assert _needs("test_compile", module, conftest) == {"tpu_compile"}
  assert _needs("test_mentions", module, conftest) == set()
  assert _needs("test_fixture", module, conftest) == {"trains"}
  assert _needs("test_helper", module, conftest) >= {"trains", "subprocess"}
  assert _needs("helper", module, conftest) == {"trains", "subprocess"}  # devices=n: not known statically
  assert _needs("test_process", module, conftest) == {"subprocess", "peer"}
  assert module.marks(module.functions["test_process"]) == {"subprocess"}
