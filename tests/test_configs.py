"""Every config in configs/ is valid, has a rule for each of its keys, and runs from any working
directory after `pip install -e .` and after a plain `pip install`."""
import glob
import importlib
import os
import shutil
import subprocess
import sys

import pytest

from sit_jax import config_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if "def get_config" in open(p).read())
TIMEOUT_S = 300  # a pip install and a few interpreters on a loaded 2-core machine; idle ~20 s.


def _arguments(name):
  """Every argument a config documents: none, runlocal, and each dataset of its tables."""
  module = importlib.import_module(f"configs.{name}")
  datasets = sorted(getattr(module, "RECIPES", None) or getattr(module, "DATASETS", None) or ())
  return [None, "runlocal", *(f"dataset={d}" for d in datasets)]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_is_valid_and_every_key_has_a_rule(name):
  for argument in _arguments(name):
    spec = os.path.join(REPO, "configs", f"{name}.py") + (f":{argument}" if argument else "")
    try:
      config = config_check.load(spec)
    except config_check.ConfigError as e:
      if "No defaults for dataset" in str(e):  # a DATASETS row without a recipe in this config
        continue
      raise
    config_check.check(config)
    unruled = sorted(set(config_check.flatten(config)) - set(config_check.RULES))
    assert not unruled, f"{spec}: add a row to config_check.RULES for {unruled}"


def test_rules_agree_with_the_code_they_guard():
  """config_check cannot import these modules (they import jax): their names, checked here."""
  from sit_jax import data, gmml, transfer
  from sit_jax.models import vit
  rules = config_check.RULES
  assert rules["gmml.fills"].ok(tuple(gmml.VALID_FILLS))
  assert all(rules["data.interpolation"].ok(name) for name in data.INTERPOLATIONS)
  assert all(rules["data.engine"].ok(name) for name in data.ENGINES)
  assert set(config_check.TRANSFER_EXPERIMENTS) == set(transfer.EXPERIMENTS)


def test_runlocal_changes_the_corruption_ratio_of_sit_only():
  """shrink_for_runlocal's ratio was chosen for SiT; GMML alone keeps its paper's 0.75."""
  def ratio(spec):
    return config_check.load(os.path.join(REPO, "configs", spec)).gmml.ratio

  assert ratio("sit_vits.py:runlocal") == ratio("sit_small.py:runlocal") == 0.3
  assert ratio("gmml_vits.py:runlocal") == ratio("gmml_vits.py") == 0.75
  assert ratio("sit_vits.py") == 0.5


def _run(args, cwd, env=None):
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
  return result.returncode, result.stdout, result.stderr


def _load_every_config(cwd, env=None, root="configs"):
  """In a fresh interpreter in `cwd`: load and check every config as `root`/NAME.py."""
  code = ("import sys; from sit_jax import config_check as c\n"
          f"for name in {CONFIGS!r}:\n"
          f"  path = c.resolve({root!r} + '/' + name + '.py')\n"
          "  c.check(c.load(path + ':runlocal'))\n"
          "  print(path)\n")
  returncode, stdout, stderr = _run(["-c", code], cwd, env)
  assert returncode == 0, stderr
  return stdout.split()


def test_configs_run_from_any_directory(tmp_path):
  """The development install: `configs/NAME.py` and an absolute path both work elsewhere, even
  in a project with a `configs` package of its own (it hid sit_jax's: 'not found')."""
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("")
  paths = _load_every_config(tmp_path)
  assert paths == [os.path.join(REPO, "configs", f"{n}.py") for n in CONFIGS]
  _load_every_config(tmp_path, root=os.path.join(REPO, "configs"))
  # The real entry point, stopped by its config check once the config and override loaded.
  returncode, _, stderr = _run(["-m", "sit_jax.main", "--config=configs/knn.py:runlocal",
                                "--config.knn.chunk_size=0", f"--workdir={tmp_path}/w"], tmp_path)
  assert returncode == 1 and stderr.strip() == (
      "sit_jax: error: config.knn.chunk_size=0 is invalid: it must be an integer >= 1 "
      "(set --config.knn.chunk_size).")


def test_configs_after_a_plain_install(tmp_path):
  """`pip install .` (not editable) into a fresh directory: sit_jax and its configs come from
  there, and `configs/NAME.py` names the installed copy from any working directory."""
  source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
  for path in ("sit_jax", "configs"):
    shutil.copytree(os.path.join(REPO, path), source / path,
                    ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(REPO, "setup.py"), source)
  returncode, _, stderr = _run(["-m", "pip", "install", "--quiet", "--no-deps",
                                "--no-build-isolation", "--no-index", "--target", str(site),
                                str(source)], tmp_path)
  assert returncode == 0, stderr
  os.makedirs(elsewhere)
  env = {**os.environ, "PYTHONPATH": str(site)}
  paths = _load_every_config(elsewhere, env)
  assert paths == [os.path.join(str(site), "configs", f"{n}.py") for n in CONFIGS]
  # A project's own `configs` package hides the installed one from `from configs import common`
  # (the development install's finder, dropped here, still finds it): the line says so.
  project = elsewhere / "project"
  os.makedirs(project / "configs")
  (project / "configs" / "__init__.py").write_text("")
  code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'Editable' not in str(f)]\n"
          "from sit_jax import config_check as c\n"
          "try:\n  c.load(c.resolve('configs/sit_vits.py'))\n"
          "except c.ConfigError as e:\n  print(e)\n")
  returncode, stdout, stderr = _run(["-c", code], project, env)
  assert returncode == 0, stderr
  assert stdout.startswith(f"Config file {site}/configs/sit_vits.py: ImportError"), stdout
  assert f"`import configs` finds {project}/configs, which hides sit_jax's configs " \
         f"({site}/configs): run from a directory without a `configs` package." in stdout


@pytest.mark.parametrize("name", ["sit_vits", "finetune", "linear", "segment"])
def test_epochs_may_be_fractional(name):
  """--config.optim.warmup_epochs=2.5: the fields are floats, so the command line may set one."""
  module = importlib.import_module(f"configs.{name}")
  for arg in ("", "runlocal"):
    c = module.get_config(arg)
    c.optim.warmup_epochs, c.total_epochs = 2.5, 1.5
