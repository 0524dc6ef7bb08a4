"""The structure stays honest: a leaf config, no import cycles (function-local imports counted),
function-local project imports only where they defer a heavy dependency (and say so), short
modules. The layering contracts themselves are checked by ``lint-imports`` (pyproject.toml), which
the test command runs before pytest."""

import ast
import json
import pathlib
import subprocess
import sys

import grimp
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("sparsejax", "kernels_pallas")
MAX_LINES = 400


def _sources():
  for pkg in PACKAGES:
    yield from sorted((REPO / pkg).rglob("*.py"))


def test_config_is_a_leaf():
  code = ("import sys, json; import sparsejax.config, sparsejax.errors; "
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  loaded = set(json.loads(out))
  heavy = {"jax", "jaxlib", "flax", "optax", "orbax", "numpy", "ml_collections", "grain",
           "kernels_pallas"}
  assert not loaded & heavy, f"import sparsejax.config loads {sorted(loaded & heavy)}"


def _strongly_connected(graph) -> list[list[str]]:
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.find_modules_directly_imported_by(v):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for m in sorted(graph.modules):
    if m not in index:
      visit(m)
  return out


def test_no_import_cycles():
  graph = grimp.build_graph(*PACKAGES)  # every import statement, function-local ones included
  assert _strongly_connected(graph) == []


def test_cycle_detector_finds_a_cycle():
  class Fake:
    modules = {"a", "b", "c"}

    @staticmethod
    def find_modules_directly_imported_by(m):
      return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[m]
  assert _strongly_connected(Fake()) == [["a", "b"]]


def _local_project_imports(path: pathlib.Path):
  """(line, module) of imports of sparsejax / kernels_pallas inside functions, with whether the
  import line or the line above carries a 'defers' comment."""
  text = path.read_text()
  lines = text.splitlines()
  tree = ast.parse(text)
  for fn in ast.walk(tree):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    for node in ast.walk(fn):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
      else:
        continue
      if any(n.split(".")[0] in PACKAGES for n in names):
        i = node.lineno - 1
        commented = "defers" in lines[i] or (i > 0 and "defers" in lines[i - 1])
        yield node.lineno, names[0], commented


def test_function_local_project_imports_say_what_they_defer():
  bad = [f"{p.relative_to(REPO)}:{line} {mod}" for p in _sources()
         for line, mod, ok in _local_project_imports(p) if not ok]
  assert bad == [], "function-local project imports without a '# defers ...' comment: " + \
      ", ".join(bad)


def test_local_import_scan_sees_an_undocumented_import(tmp_path):
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from sparsejax import config\n\n"
               "def g():\n  # defers jax\n  from sparsejax import data\n")
  assert [(line, ok) for line, _, ok in _local_project_imports(f)] == [(2, False), (6, True)]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_module_over_the_line_limit(pkg):
  long = {str(p.relative_to(REPO)): n for p in sorted((REPO / pkg).rglob("*.py"))
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_training_loop_stays_thin():
  assert len((REPO / "sparsejax" / "train" / "loop.py").read_text().splitlines()) <= 300


@pytest.mark.parametrize("folder", ["benchmarks", "experiments", "launch", "configs", "tests"])
def test_scripts_outside_the_package_compile(folder):
  """Scripts that no test imports still parse (a refactor's mechanical edit broke one once)."""
  bad = []
  for p in sorted((REPO / folder).rglob("*.py")):
    try:
      compile(p.read_text(), str(p), "exec")
    except SyntaxError as e:
      bad.append(f"{p.relative_to(REPO)}:{e.lineno}: {e.msg}")
  assert bad == []
