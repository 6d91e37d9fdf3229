"""benchmarks/learning.py prints its row in benchmarks/learning.md's columns, each cell from the
score the column names (it printed a nested JSON dict, leaving the mapping to the reader)."""
import importlib.util
import os

from sit_jax import main  # noqa: F401  (its --config flag, as in a session of every test file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_learning():
  spec = importlib.util.spec_from_file_location(
      "learning_benchmark", os.path.join(REPO, "benchmarks", "learning.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def scored(base):
  """Distinct figures per feature and probe: base + 0.01 x feature + 0.001 for logistic."""
  features = ("cls", "mean", "cls+mean", "last4:cls", "last4:cls+mean")
  return {name: {"knn": base + 0.01 * i, "logistic": base + 0.01 * i + 0.001}
          for i, name in enumerate(features)}


def test_the_table_has_learning_md_columns():
  learning = load_learning()
  row = {"name": "E", "final_metrics": {"contrastive": 1.7712}, "student": scored(0.5),
         "teacher": scored(0.6), "raw_pixels": {"knn": 0.97, "logistic": 0.965},
         "random_init": scored(0.3)}
  header, _, run, raw, random = learning.table(row, 16).splitlines()
  doc = open(os.path.join(REPO, "benchmarks", "learning.md")).read()
  assert "| " + header.split("| ", 2)[2] in doc  # the columns after the run's name
  cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
  # k-NN CLS student / teacher, k-NN mean patch, linear CLS, linear last-4 CLS, contrastive.
  assert cells(run) == ["E", "0.500 / 0.600", "0.510", "0.501", "0.531", "1.77"]
  assert cells(raw) == ["raw pixels, 16 px", "0.970", "", "0.965", "", ""]
  assert cells(random) == ["random init", "0.300", "0.310", "0.301", "0.331", ""]


def test_a_finished_run_is_scored_again_by_the_same_command(tmp_path):
  """Pretraining saves the example count it read (num_train_examples, 0 in the config) in
  config.json; the same command then read as another config, and a finished run could not be
  scored again."""
  import json
  from configs import sit_vits
  from sit_jax import metrics
  learning = load_learning()
  config = sit_vits.get_config("runlocal")
  config.data.split = "train[:1200]"  # learning.py's --split=val
  saved = json.loads(metrics.to_json(config.to_dict()))
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**saved, "num_train_examples": 1200}))  # pretraining's record
  assert learning.settings_changed(str(path), config) == ""
  path.write_text(json.dumps({**saved, "num_train_examples": 1500}))  # the data changed since
  assert learning.settings_changed(str(path), config) == \
      "num_train_examples: 1500 then, 1200 now"


def test_split_keys_on_the_command_line_are_refused_not_replaced():
  """--split sets the pretraining split and the monitor's bank and held-out split: an override of
  one of them used to be replaced without a word."""
  learning = load_learning()
  overrides = {"data": {"split": "train[:50%]", "image_size": 16}, "eval": {"k": 5}}
  assert learning.split_overrides(overrides) == ["data.split"]
  assert learning.split_overrides({"eval": {"test_split": "test", "k": 5}}) == ["eval.test_split"]
  assert learning.split_overrides({"data": {"image_size": 16}}) == []
