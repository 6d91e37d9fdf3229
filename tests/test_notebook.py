"""launch/colab_tpu.ipynb is valid and runs top to bottom on the CPU (its TPU-only cell skipped)."""
import builtins
import json
import os
import re
import symtable
import sys
import types

import pytest
import conftest

nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")


def _is_tpu_only(cell):
  return "tpu-only" in cell.get("metadata", {}).get("tags", [])


def test_notebook_is_valid_nbformat4():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.cells[0].cell_type == "markdown"
  tpu_cells = [c for c in nb.cells if _is_tpu_only(c)]
  assert len(tpu_cells) == 1 and "jax.devices()" in tpu_cells[0].source
  sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert "pip" in sources and "configs/sit_vits.py:runlocal" in sources
  assert "configs/knn.py:runlocal" in sources and "results.json" in sources
  # The TPU runtime's jax[tpu] install admits what setup.py admits: another range makes pip's
  # resolution impossible on Colab (which no CPU test here would see).
  setup = open(os.path.join(REPO, "setup.py")).read()
  jax_range = re.search(r'"jax(>=[^"]+)"', setup).group(1)
  assert f'"jax[tpu]{jax_range}"' in sources


def _run_with_nbclient(nb):
  from nbclient import NotebookClient
  NotebookClient(nb, kernel_name="python3", timeout=300,
                 resources={"metadata": {"path": REPO}}).execute()
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def _run_with_exec(nb):
  """Without a Jupyter kernel: exec() the cells; `!cmd {var}` lines go to the shell."""
  namespace = {}
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    for cell in nb.cells:
      if cell.cell_type != "code":
        continue
      lines = []
      for line in cell.source.splitlines():
        if line.lstrip().startswith("!"):
          command = re.sub(r"\{(\w+)\}", lambda m: str(namespace[m.group(1)]),
                           line.lstrip()[1:])
          lines.append(f"__import__('subprocess').run({command!r}, shell=True, check=True)")
        else:
          lines.append(line)
      namespace.setdefault("display", lambda *a, **k: None)
      exec(compile("\n".join(lines), "<notebook cell>", "exec"), namespace)
  finally:
    os.chdir(cwd)
  return ""


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  workdir = str(tmp_path / "sit_local")
  monkeypatch.setenv("SIT_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("SIT_NOTEBOOK_STEPS", "2")
  # One CPU device (and the suite's lowest optimisation level: the compiles dominate this test).
  monkeypatch.setenv("XLA_FLAGS", conftest.xla_flags(1))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = [c for c in nb.cells if not _is_tpu_only(c)]
  try:
    import ipykernel  # noqa: F401
    import nbclient  # noqa: F401
    from jupyter_client.kernelspec import KernelSpecManager
    have_kernel = "python3" in KernelSpecManager().find_kernel_specs()
  except ImportError:
    have_kernel = False
  output = _run_with_nbclient(nb) if have_kernel else _run_with_exec(nb)

  metrics = [json.loads(line) for line in open(os.path.join(workdir, "pretrain", "metrics.jsonl"))]
  assert metrics[-1]["step"] == 2
  results = json.load(open(os.path.join(workdir, "knn", "results.json")))
  assert results["experiment"] == "knn" and 0.0 <= results["top1"] <= 1.0
  assert results["init"].startswith(os.path.join(workdir, "pretrain"))
  if have_kernel:
    assert "k-NN top-1 accuracy" in output and "step    2" in output


def test_metrics_cell_skips_evaluation_only_rows(tmp_path):
  """At the notebook's defaults (1,200 steps, a log every 120, the k-NN monitor every 500) steps
  500 and 1,000 have rows with the k-NN figures only: the cell printing the losses must pass them
  (it raised KeyError: 'loss' after the whole pretraining)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c.source for c in nb.cells if c.cell_type == "code" and "metrics.jsonl" in c.source)
  (tmp_path / "pretrain").mkdir()
  rows = [{"step": 480, "loss": 1.5, "recon": 0.5, "contrastive": 1.0},
          {"step": 500, "knn/student": 0.9, "knn/teacher": 0.9},
          {"step": 600, "loss": 1.4, "recon": 0.5, "contrastive": 0.9}]
  (tmp_path / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  printed = []
  exec(compile(cell, "<notebook cell>", "exec"),
       {"WORKDIR": str(tmp_path), "glob": __import__("glob"), "json": json,
        "print": printed.append})
  assert [line.split()[1] for line in printed] == ["480", "600"]


def test_on_drive_the_outputs_outlive_the_runtime(monkeypatch):
  """With ON_DRIVE the first cell mounts Google Drive and puts WORKDIR there, so that after a
  disconnect (which erases /content) running the cells again resumes the pretraining."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code")
  mounted = []
  colab = types.ModuleType("google.colab")
  colab.drive = types.SimpleNamespace(mount=mounted.append)
  monkeypatch.setitem(sys.modules, "google.colab", colab)
  monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
  monkeypatch.setenv("SIT_NOTEBOOK_DRIVE", "1")
  monkeypatch.delenv("SIT_NOTEBOOK_WORKDIR", raising=False)
  monkeypatch.chdir(REPO)  # the cell finds this checkout, installed: no clone, no pip
  namespace = {}
  exec(compile(cell.source, "<notebook cell>", "exec"), namespace)
  assert mounted == ["/content/drive"]
  assert namespace["WORKDIR"] == "/content/drive/MyDrive/sit_local"
  monkeypatch.delenv("SIT_NOTEBOOK_DRIVE")
  exec(compile(cell.source, "<notebook cell>", "exec"), namespace)
  assert mounted == ["/content/drive"] and namespace["WORKDIR"] == "/content/sit_local"


def _names_read(source: str) -> set[str]:
  """The names a cell takes from the kernel's namespace: those its Python reads without defining
  them (builtins aside), and the `{name}`s of its `!command` lines."""
  lines = source.splitlines()
  names = {n for line in lines if line.lstrip().startswith("!")
           for n in re.findall(r"\{(\w+)\}", line)}
  top = symtable.symtable("\n".join(l for l in lines if not l.lstrip().startswith("!")),
                          "<notebook cell>", "exec")
  defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
  tables = [top]
  while tables:
    table = tables.pop()
    tables += table.get_children()
    names |= {s.get_name() for s in table.get_symbols() if s.is_referenced()
              and (table is top or s.is_global() or s.is_free())}
  return names - defined - set(dir(builtins))


def test_every_cell_needs_only_the_first_one(monkeypatch):
  """After a new runtime the first cell, then any cell, must run: the results cell read `json`,
  `Image` and `display` from the losses cell's imports (NameError: name 'json' is not defined
  when the k-NN of a pretraining done before was run and shown without the losses)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  setup, *cells = [c.source for c in nb.cells if c.cell_type == "code"]
  monkeypatch.delenv("SIT_NOTEBOOK_DRIVE", raising=False)
  monkeypatch.chdir(REPO)  # the cell finds this checkout, installed: no clone, no pip
  namespace = {}
  exec(compile(setup, "<notebook cell>", "exec"), namespace)
  missing = {i: sorted(_names_read(cell) - set(namespace)) for i, cell in enumerate(cells, 2)}
  assert {i: names for i, names in missing.items() if names} == {}
