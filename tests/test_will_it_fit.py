"""benchmarks/will_it_fit.py: the README's "Will it fit" tables are what --markdown prints from the
committed rows, and a command that cannot measure anything says so in one line instead of
exiting 0 (a filter that matches no row) or with a traceback (no libtpu)."""
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def will_it_fit(*args):
  return subprocess.run([sys.executable, "benchmarks/will_it_fit.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("rows, extra", [("will_it_fit.jsonl", ()),
                                         ("will_it_fit_scaling.jsonl", ("--scaling",))])
def test_readme_tables_are_the_committed_rows(rows, extra):
  proc = will_it_fit(f"--markdown=benchmarks/{rows}", *extra)
  assert proc.returncode == 0, proc.stderr
  table = proc.stdout.strip().splitlines()
  assert len(table) >= 6
  readme = open(os.path.join(REPO, "README.md")).read().splitlines()
  assert [line for line in table if line not in readme] == []


@pytest.mark.parametrize("args", [("--only=b/16",), ("--generation=v6e",),
                                  ("--only=S/16", "--parallelism=model=4")])
def test_a_filter_that_matches_no_row_is_one_line(tmp_path, args):
  out = tmp_path / "rows.jsonl"
  proc = will_it_fit(*args, f"--out={out}")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "no row matches" in proc.stderr and args[0].split("=")[0] in proc.stderr
  assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the rows would compile")
def test_without_libtpu_one_line_and_no_row(tmp_path):
  out = tmp_path / "rows.jsonl"
  proc = will_it_fit("--only=S/16", "--generation=v5e", f"--out={out}")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "needs libtpu" in proc.stderr and "Traceback" not in proc.stderr
  assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (("--markdown=benchmarks/no_such_rows.jsonl",), "no such file"),
    (("--scaling", "--markdown=benchmarks/will_it_fit.jsonl"), "rows of 6 models")])
def test_a_table_that_cannot_be_printed_is_one_line(args, message):
  """A missing file was a traceback; the main table's rows read as --scaling printed a table of
  whichever model's row came last in each cell."""
  proc = will_it_fit(*args)
  assert proc.returncode != 0 and not proc.stdout
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
