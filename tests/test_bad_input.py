"""Every bad input ends, before any work, with exit status 1 and one line on stderr that names
what to change; and the rules of sit_jax/config_check.py, one by one."""
import os
import subprocess
import sys

import ml_collections
import pytest

from sit_jax import config_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIT = "--config=configs/sit_vits.py:runlocal"
KNN = "--config=configs/knn.py:runlocal"

# (id, command-line arguments, what the one line must say). TMP is the test's directory; every
# case gets a --workdir (NO_WORKDIR: none). More values: test_values_of_each_experiment.
CASES = [
    ("misspelt_key", [SIT, "--config.optim.lrr=1"], ["optim.lrr", "base_lr, clip_norm"]),
    ("missing_config_file", ["--config=configs/sit_vit.py"], ["configs/sit_vit.py not found",
                                                             "configs/sit_vits.py"]),
    ("config_syntax_error", ["--config=TMP/broken.py"], ["broken.py line 3", "Syntax error"]),
    ("unknown_config_argument", ["--config=configs/knn.py:datset=x"],
     ["'datset'", "did you mean 'dataset'", "dataset, runlocal, temperature"]),
    ("batch_size_0", [SIT, "--config.data.global_batch_size=0"],
     ["data.global_batch_size=0", "integer >= 1"]),
    ("log_every_0", [SIT, "--config.log_every=0"], ["log_every=0", "integer >= 1"]),
    # PRNGKey keeps 32 bits: 2**32 drew seed 0's initialisation and masks on other batches.
    ("seed_beyond_32_bits", [SIT, "--config.seed=4294967296"],
     ["seed=4294967296", "[0, 4294967295]"]),
    ("image_every_0", [SIT, "--config.image_every=0"], ["image_every=0", "integer >= 1"]),
    ("dtype", [SIT, "--config.model.dtype=float16x"], ["model.dtype='float16x'", "'bfloat16'"]),
    ("gmml_ratio_above_1", [SIT, "--config.gmml.ratio=1.5"], ["gmml.ratio=1.5", "[0, 1]"]),
    ("gmml_ratio_negative", [SIT, "--config.gmml.ratio=-0.1"], ["gmml.ratio=-0.1", "[0, 1]"]),
    # The natural spelling is one string, ('zeros,noise',): the line shows the quoted tuple.
    ("fills_unquoted", [SIT, "--config.gmml.fills=zeros,noise"],
     ["config.gmml.fills=('zeros,noise',) is invalid", "\"('noise', 'zeros')\""]),
    ("donor_group_not_a_divisor", [SIT, "--config.gmml.donor_group=48"],
     ["gmml.donor_group 48 does not divide data.global_batch_size 64", "0 for the whole view"]),
    ("compiler_options_format", [SIT, "--config.compiler_options=fast"],
     ["config.compiler_options='fast' is invalid", "name=value"]),
    ("compiler_option_unknown_to_the_backend",
     [SIT, "--config.compiler_options=xla_cpu_enable_fast_mathh=false"],
     ["config.compiler_options", "xla_cpu_enable_fast_mathh", "for cpu"]),
    ("finetune_compiler_option_unknown_to_the_backend",
     ["--config=configs/finetune.py:runlocal", "--config.compiler_options=xla_cpu_fast=false"],
     ["config.compiler_options", "xla_cpu_fast", "for cpu"]),
    ("temperature_0", [SIT, "--config.loss.temperature=0"], ["loss.temperature=0", "> 0"]),
    ("negative_lr", [SIT, "--config.optim.base_lr=-0.001"], ["optim.base_lr=-0.001", "> 0"]),
    ("proj_dim_0", [SIT, "--config.model.proj_dim=0"], ["model.proj_dim=0", ">= 1"]),
    ("checkpoint_every_0", [SIT, "--config.checkpoint_every=0"], ["checkpoint_every=0"]),
    ("knn_temperature_0", [KNN, "--config.knn.temperature=0"], ["knn.temperature=0", "> 0"]),
    ("value_type", [SIT, "--config.log_every=abc"], ["config.log_every=abc"]),
    # Mistakes the run itself once found only after reading the dataset and writing the workdir.
    ("heads_not_split_by_model", ["--config=configs/sit_vits.py:runlocal,model=2"],
     ["model.variant 'Mu/4' has 3 attention heads", "mesh model=2", "divides 3 (1, 3)",
      "model=N"]),
    ("recons_blocks_past_depth", [SIT, "--config.model.recons_blocks=(6,8,10,12)"],
     ["config.model.recons_blocks=(6, 8, 10, 12)", "outside 1..4", "'Mu/4'"]),
    ("two_mesh_axes_minus_1", [SIT, "--config.mesh.fsdp=-1"],
     ["mesh.data and mesh.fsdp are both -1", "mesh.data=1"]),
    ("experiment_of_another_config", [SIT, "--config.experiment=finetune"],
     ["config.experiment='finetune' needs config.head", "configs/finetune.py"]),
    ("multilabel_frozen_by_key", ["--config=configs/multilabel.py:runlocal",
                                  "--config.multilabel.frozen=True"],
     ["config.multilabel.frozen=True needs config.linear", "multilabel.py:frozen=True"]),
    ("init_missing", [KNN, "--config.init=TMP/no_such_run"],
     ["config.init=", "no_such_run' does not exist", "--config.init"]),
    ("init_nothing_loadable", [KNN, "--config.init=TMP/empty_run"],
     ["Nothing loadable at", "empty_run: expected a backbone export", "searched"]),
    ("teacher_of_random_init", [KNN, "--config.init_weights=teacher"],
     ["config.init_weights='teacher'", "config.init is '' (random init)", "--config.init"]),
    ("teacher_of_an_export", [KNN, "--config.init=TMP/export", "--config.init_weights=teacher"],
     ["export is a backbone export, which holds the student only", "init_weights='student'"]),
    ("last_blocks_past_depth", ["--config=configs/linear.py:runlocal",
                                "--config.head.last_blocks=5"],
     ["config.head.last_blocks=5", "the 4 blocks of model.variant 'Mu/4'", "at most 4"]),
    ("image_size_off_the_patch_grid", [KNN, "--config.data.image_size=18"],
     ["data.image_size", "Image size 18", "patch size 4", "e.g. 16"]),
    # Silently accepted before: model=0 ran data-parallel, dataset= was ignored by runlocal.
    ("model_argument_0", ["--config=configs/sit_vitb.py:model=0"], ["model=0", ">= 1"]),
    ("runlocal_and_dataset", ["--config=configs/finetune.py:runlocal,dataset=cifar10"],
     ["runlocal and dataset=cifar10", "embedded digits", "drop one"]),
    # absl took the last; the overrides were checked against the first ('knn' / a traceback).
    ("config_given_twice", [KNN, "--config.knn.k=4", SIT],
     ["--config is given 2 times (configs/knn.py:runlocal, configs/sit_vits.py:runlocal)",
      "give one config file"]),
    ("unknown_flag", [SIT, "--workdr=/tmp/x"], ["workdr", "workdir"]),
    ("no_config", [], ["--config"]),
    ("no_workdir", [SIT, "NO_WORKDIR"], ["--workdir"]),
    ("positional_argument", [SIT, "train"], ["['train']"]),
]
# The whole suite shares 2 cores: every case waits at most this long (idle: about 3 s).
TIMEOUT_S = 120


def _command(args, workdir, tmp):
  args = [a.replace("TMP", str(tmp)) for a in args]
  if "NO_WORKDIR" in args:
    args.remove("NO_WORKDIR")
  else:
    args.append(f"--workdir={workdir}")
  return [sys.executable, "-m", "sit_jax.main", *args]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every case at once (each is a fresh interpreter that stops before any jax work)."""
  tmp = tmp_path_factory.mktemp("bad_input")
  (tmp / "broken.py").write_text("def get_config(arg=None):\n  c = {}\n  return c[\n")
  (tmp / "empty_run").mkdir()  # a workdir whose run wrote nothing yet
  (tmp / "export" / "params").mkdir(parents=True)  # what locate_backbone takes for an export
  (tmp / "export" / "model_config.json").write_text("{}")
  env = {k: v for k, v in os.environ.items() if k != "SIT_JAX_TRACEBACK"}
  running = {}
  for name, args, _ in CASES:
    workdir = tmp / f"workdir_{name}"
    running[name] = (workdir, subprocess.Popen(
        _command(args, workdir, tmp), cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  done = {}
  for name, (workdir, process) in running.items():
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    done[name] = (process.returncode, stdout, stderr, workdir)
  return done


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_before_any_work(results, name, args, expected):
  returncode, stdout, stderr, workdir = results[name]
  assert returncode == 1, (stdout, stderr)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("sit_jax: error: "), stderr
  for text in expected:
    assert text in lines[0], (text, lines[0])
  assert not stdout
  assert not os.path.exists(workdir)  # nothing started


def test_internal_names_stay_out(results):
  """The line speaks of the setting the user gave, not of the function that would fail."""
  line = results["checkpoint_every_0"][2]
  assert "save_interval_steps" not in line and "--config.checkpoint_every" in line


def test_traceback_on_request(tmp_path):
  result = subprocess.run(
      _command([SIT, "--config.gmml.ratio=1.5"], tmp_path / "w", tmp_path), cwd=REPO,
      env={**os.environ, "SIT_JAX_TRACEBACK": "1"}, capture_output=True, text=True,
      timeout=TIMEOUT_S)
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "ConfigError" in result.stderr


# sit_jax.main with the run replaced by BODY.
STUB_RUN = """
import errno, sys
from absl import app
from sit_jax import main

def run(config, workdir):
  BODY

main.run = run
app.run(main.main, flags_parser=main.parse_flags, argv=sys.argv)
"""
FULL_DISK = STUB_RUN.replace(
    "BODY", 'raise OSError(errno.ENOSPC, "No space left on device", workdir + "/metrics.jsonl")')


def test_a_full_disk_outside_a_save_is_one_line(tmp_path):
  """A write that fails for lack of space (metrics, pictures, results) is the storage's doing:
  one line naming the file and what to do, not a traceback."""
  result = subprocess.run(
      [sys.executable, "-c", FULL_DISK, SIT, f"--workdir={tmp_path}"], cwd=REPO,
      env={k: v for k, v in os.environ.items() if k != "SIT_JAX_TRACEBACK"},
      capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
  assert f"{tmp_path}/metrics.jsonl" in lines[0] and "resumes from the latest" in lines[0]


def test_settings_the_run_does_not_read_are_named(tmp_path):
  """An override the experiment never reads ran silently and sat in config.json as though it
  had shaped the run: a warning names each, before the run (stubbed here) starts."""
  result = subprocess.run(
      [sys.executable, "-c", STUB_RUN.replace("BODY", "pass"), "--config=configs/contrastive_vits.py:runlocal",
       f"--workdir={tmp_path}", "--config.gmml.ratio=0.9", "--config.teacher.momentum=0.9",
       "--config.eval_every=0", "--config.eval.k=5", "--config.loss.alpha=2.0"],
      cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr
  assert [line.split("] ", 1)[1] for line in result.stderr.splitlines()
          if "has no effect" in line] == [
      "--config.gmml.ratio=0.9 has no effect: config.experiment='contrastive' trains on clean "
      "views (--config.gmml.enabled=True corrupts them).",
      "--config.eval.k=5 has no effect: the k-NN monitor is off (eval_every=0).",
      "--config.loss.alpha=2.0 has no effect: config.experiment='contrastive' has no "
      "reconstruction."]


@pytest.mark.parametrize("spec,overrides,unread", [
    ("gmml_vits.py:runlocal", {"teacher.momentum": 0.9, "gmml.ratio": 0.5, "eval.k": 5},
     ["--config.teacher.momentum=0.9 has no effect: config.experiment='gmml' has no "
      "contrastive loss or teacher."]),
    ("contrastive_vits.py:runlocal", {"gmml.enabled": True, "gmml.ratio": 0.5}, []),
    ("sit_vits.py:runlocal", {"gmml.replace_ratio": 0.5, "gmml.ratio": 0.5},
     ["--config.gmml.replace_ratio=0.5 has no effect: gmml.fills=('zeros',) has no 'replace'."]),
    ("sit_vits.py", {"gmml.fills": ("replace",), "gmml.ratio": 0.6, "gmml.replace_ratio": 0.5},
     ["--config.gmml.ratio=0.6 has no effect: gmml.fills=('replace',) corrupts by "
      "gmml.replace_ratio alone."]),
    ("sit_vits.py", {"gmml.ratio": 0.5, "loss.alpha": 0.0, "eval.k": 5},
     ["--config.eval.k=5 has no effect: the k-NN monitor is off (eval_every=0)."]),
    ("knn.py:runlocal", {"knn.k": (5,)}, []),
    # :runlocal fixes the length in steps: 50 epochs ran its 2,000 (1,000) steps, silently.
    ("sit_vits.py:runlocal", {"total_epochs": 50.0},
     ["--config.total_epochs=50.0 has no effect: total_steps=2000 sets the run's length "
      "(--config.total_steps=0 runs total_epochs)."]),
    ("finetune.py:runlocal", {"total_epochs": 5.0, "optim.warmup_epochs": 1.0},
     ["--config.total_epochs=5.0 has no effect: total_steps=1000 sets the run's length "
      "(--config.total_steps=0 runs total_epochs)."]),
    ("sit_vits.py", {"total_steps": 20, "total_epochs": 1.0},
     ["--config.total_epochs=1.0 has no effect: total_steps=20 sets the run's length "
      "(--config.total_steps=0 runs total_epochs)."]),
    ("sit_vits.py:runlocal", {"total_steps": 0, "total_epochs": 5.0}, []),
    # The frozen evaluations: a probe's or k-NN's sweep of a setting it never reads scored the
    # same every time, silently.
    ("linear.py:dataset=cifar10", {"optim.base_lr": 0.01, "linear.l2": (1e-3,)},
     ["--config.optim.base_lr=0.01 has no effect: linear.solver='lbfgs' fits the head on all "
      "the train features at once, to convergence (linear.max_iter, linear.tol), its l2 chosen "
      "among linear.l2."]),
    ("linear.py", {"linear.l2": (1e-3,), "optim.base_lr": 0.01},
     ["--config.linear.l2=(0.001,) has no effect: linear.cache_features=False trains the head "
      "by SGD on augmented crops with config.optim."]),
    ("knn.py", {"data.global_batch_size": 128, "eval_batch_size": 128},
     ["--config.data.global_batch_size=128 has no effect: config.experiment='knn' extracts "
      "features in batches of eval_batch_size."]),
    # XLA options go to the training step of fine-tuning and segmentation; a probe has none.
    ("linear.py:runlocal", {"compiler_options": "xla_cpu_enable_fast_math=true"},
     ["--config.compiler_options='xla_cpu_enable_fast_math=true' has no effect: "
      "config.experiment='linear' compiles no training step with config.compiler_options "
      "(fine-tuning and segmentation do)."]),
    ("segment.py:runlocal", {"compiler_options": "xla_cpu_enable_fast_math=true"}, []),
])
def test_unread_overrides(spec, overrides, unread):
  config = config_check.load(os.path.join(REPO, "configs", spec))
  config.update_from_flattened_dict(overrides)
  assert config_check.unread_overrides(config, overrides) == unread


# ---------------------------------------------------------------------------------------------
# The validator, in process.


@pytest.mark.parametrize("spec,overrides,expected", [
    ("sit_vits.py:runlocal", {"keep_checkpoints": 0}, "config.keep_checkpoints=0 is invalid"),
    ("sit_vits.py:runlocal", {"total_steps": 0, "total_epochs": 0}, "total_steps and total_"),
    ("sit_vits.py:runlocal", {"eval.k": 0}, "config.eval.k=0 is invalid"),
    ("sit_vits.py:runlocal", {"sharding_rules": (("", 3),)}, "config.sharding_rules="),
    ("knn.py:runlocal", {"head.features": "clss"}, "config.head.features='clss' is invalid"),
    ("linear.py:runlocal", {"linear.val_fraction": 1.0}, "config.linear.val_fraction=1.0 is"),
    ("finetune.py:runlocal", {"optim.layer_decay": 0.0}, "config.optim.layer_decay=0.0 is"),
    ("finetune.py:runlocal", {"augment.label_smoothing": 1.0}, "config.augment.label_smoothing="),
    ("multilabel.py:runlocal,frozen=true", {"linear.l2": ()}, "config.linear.l2=() is"),
    ("segment.py:runlocal", {"seg.blocks": (4, 5)}, "config.seg.blocks=(4, 5) names blocks"),
    ("sit_vitb.py:model=4", {"mesh.model": 8}, "model.variant 'B/16' has 12 attention heads"),
    ("knn.py:runlocal", {"experiment": "fewshot"}, "config.experiment='fewshot' needs"),
    ("knn.py:runlocal", {"data.val_split": ""}, "data.val_split is empty: knn chooses k"),
    ("fewshot.py:runlocal", {"data.val_split": ""}, "data.val_split is empty: fewshot chooses"),
    ("fewshot.py:runlocal", {"fewshot.l2": (0.0, 1.0)}, "config.fewshot.l2=(0.0, 1.0) is"),
    ("sit_vits.py:runlocal", {"model.attention": "cudnn"}, "model.attention='cudnn' (cuDNN"),
    ("sit_vits.py:runlocal", {"data.engine": "tf"}, "data.engine='tf' reads TFDS datasets only"),
    ("gmml_vits.py:runlocal", {"loss.alpha": 0.0}, "loss.alpha=0 with config.experiment='gmml'"),
])
def test_values_of_each_experiment(spec, overrides, expected):
  config = config_check.load(os.path.join(REPO, "configs", spec))
  config_check.check(config)
  config.update_from_flattened_dict(overrides)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(config)
  assert str(e.value).startswith(expected), str(e.value)


def test_segmentation_refuses_the_input_keys_it_would_ignore():
  """Segmentation squashes each image and mask itself: data.interpolation and the evaluation
  view's keys of the other transfer configs are not its settings."""
  spec = os.path.join(REPO, "configs", "segment.py")
  for key in ("data.interpolation=bicubic", "data.resize_mode=center_crop",
              "data.resize_on=device", "data.decoded_size=512"):
    with pytest.raises(config_check.ConfigError, match="Unknown config key data"):
      config_check.check_command_line(["prog", f"--config={spec}", f"--config.{key}"])


@pytest.mark.parametrize("argument,expected", [
    ("frozen=treu", "Config argument frozen=treu is not a boolean"),
    ("dataset", "Config argument dataset needs a value"),
    ("runlocal,bogus=1", "Unknown config argument 'bogus'"),
    ("frozen=true,runlocal,frozen=false", "Config argument frozen is given twice"),
])
def test_config_arguments(argument, expected):
  with pytest.raises(config_check.ConfigError, match=expected):
    config_check.load(os.path.join(REPO, "configs", f"multilabel.py:{argument}"))


def test_a_checkpoint_brings_its_own_architecture(tmp_path):
  """With config.init the backbone is the checkpoint's: config.model.variant limits nothing."""
  config = config_check.load(os.path.join(REPO, "configs", "linear.py:runlocal"))
  config.update_from_flattened_dict({"init": str(tmp_path), "head.last_blocks": 12,
                                     "data.image_size": 224})
  config_check.check(config)


def _config(**values):
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize("rule,good,bad", [
    (config_check.integer(1), [1, 7], [0, -1, 1.0, True, "1", None]),
    (config_check.integer(0, 3), [0, 3], [-1, 4]),
    (config_check.number(0, 1), [0, 0.5, 1, 1.0], [-0.1, 1.5, float("nan"), True, "0.5"]),
    (config_check.number(0, lo_open=True), [1e-9, 3], [0, 0.0, -1, float("inf")]),
    (config_check.number(0, 1, hi_open=True), [0, 0.99], [1, 1.0]),
    (config_check.one_of("a", "b"), ["a", "b"], ["c", "", None, 1]),
    (config_check.subset("x", "y"), [("x",), ("y", "x")], [(), ("x", "x"), ("z",), "x"]),
    (config_check.interval(0, 1, lo_open=True), [(0.5, 1.0), (1, 1)],
     [(0, 1), (0.6, 0.5), (0.5, 1.5), (0.5,), 0.5]),
    (config_check.numbers(config_check.COUNT), [(), (2, 3)], [(0,), (1.5,), 3]),
    (config_check.numbers(config_check.NON_NEGATIVE, min_len=1), [(0.1,)], [()]),
    (config_check.BOOL, [True, False], [0, 1, "True"]),
    (config_check.MESH_AXIS, [-1, 1, 8], [0, -2]),
    (config_check.VARIANT, ["S/16", "Mu/4", "B/8"], ["S", "X/16", "S/0", "s/16"]),
])
def test_rule_vocabulary(rule, good, bad):
  for value in good:
    assert rule.ok(value), (rule.must, value)
  for value in bad:
    assert not rule.ok(value), (rule.must, value)


def test_check_names_the_key_and_what_it_must_be():
  config = _config(log_every=50, gmml=_config(ratio=1.5))
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check(config)
  assert str(e.value) == ("config.gmml.ratio=1.5 is invalid: it must be a number in [0, 1] "
                          "(set --config.gmml.ratio).")


def test_check_skips_keys_without_a_rule_and_runs_cross_checks():
  config_check.check(_config(my_new_key=-5, total_steps=10))
  with pytest.raises(config_check.ConfigError, match="total_steps and total_epochs"):
    config_check.check(_config(total_steps=0, total_epochs=0))


def test_unknown_key_suggestions():
  config = _config(optim=_config(base_lr=1.0, min_lr=0.0), log_every=1)
  with pytest.raises(config_check.ConfigError, match=r"did you mean optim\.base_lr\?"):
    config_check.check_key(config, "optim.base_rl")
  with pytest.raises(config_check.ConfigError, match="the keys of optim are base_lr, min_lr"):
    config_check.check_key(config, "optim.warmup")
  config_check.check_key(config, "optim.base_lr")
  with pytest.raises(config_check.ConfigError, match="config.optim is a section"):
    config_check.check_key(config, "optim")
  with pytest.raises(config_check.ConfigError, match=r"did you mean optim\.base_lr"):
    config_check.check_key(config, "optimm.base_lr")


def test_command_line_forms(tmp_path):
  """'--config FILE' and '--config=FILE' both resolve; overrides are checked either way."""
  (tmp_path / "c.py").write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict(dict(a=1, arg=arg))\n")
  path = str(tmp_path / "c.py")
  assert config_check.check_command_line(["prog", "--config", path, "--config.a=2"]) == [
      "prog", f"--config={path}", "--config.a=2"]
  assert config_check.load(f"{path}:x").arg == "x"
  assert config_check.load(path).arg is None
  with pytest.raises(config_check.ConfigError, match=r"Unknown config key b \(--config.b=2\)"):
    config_check.check_command_line(["prog", f"--config={path}", "--config.b=2"])
  with pytest.raises(config_check.ConfigError, match="noa"):  # --noconfig.X: booleans
    config_check.check_command_line(["prog", f"--config={path}", "--noconfig.noa"])
  with pytest.raises(config_check.ConfigError, match=f"given 2 times \\({path}, {path}:x\\)"):
    config_check.check_command_line(["prog", "--config", path, f"--config={path}:x"])


def test_config_files_that_are_not_configs(tmp_path):
  (tmp_path / "none.py").write_text("x = 1\n")
  (tmp_path / "dict.py").write_text("def get_config():\n  return {}\n")
  (tmp_path / "imports.py").write_text("import no_such_module\n")
  with pytest.raises(config_check.ConfigError, match="has no get_config"):
    config_check.load(str(tmp_path / "none.py"))
  with pytest.raises(config_check.ConfigError, match="returned dict, not a ConfigDict"):
    config_check.load(str(tmp_path / "dict.py"))
  with pytest.raises(config_check.ConfigError, match="ModuleNotFoundError: No module named"):
    config_check.load(str(tmp_path / "imports.py"))
  # A workdir's record of its run, given as the config: one line, not 'NoneType' has no 'loader'.
  (tmp_path / "config.json").write_text('{"seed": 0}\n')
  with pytest.raises(config_check.ConfigError, match="config.json is JSON: --config takes a"):
    config_check.load(str(tmp_path / "config.json"))
  # Python source under any name, as config_flags itself loads it.
  (tmp_path / "my_exp").write_text("import ml_collections\n"
                                   "def get_config(arg=None):\n"
                                   "  return ml_collections.ConfigDict(dict(arg=arg))\n")
  assert config_check.load(f"{tmp_path / 'my_exp'}:runlocal").arg == "runlocal"


# ---------------------------------------------------------------------------------------------
# A run refused after its workdir was made (a split it cannot read, a batch the mesh cannot
# split, Ctrl-C) leaves no directory that looks like a run's, and keeps whatever was saved.


def _experiment_config():
  return ml_collections.ConfigDict(dict(experiment="knn", mesh=dict(data=-1, fsdp=1, model=1),
                                        data=dict(global_batch_size=8)))


@pytest.mark.parametrize("error", [ValueError("data.train_split='bogus'"), KeyboardInterrupt()],
                         ids=["refused", "ctrl_c"])
@pytest.mark.parametrize("opens_the_writer", [False, True])
def test_a_workdir_made_by_a_refused_run_is_removed(tmp_path, error, opens_the_writer):
  from sit_jax import experiment
  workdir = tmp_path / "new" / "run"  # both directories made by the run
  with pytest.raises(type(error)):
    with experiment.Experiment(_experiment_config(), str(workdir)) as exp:
      assert sorted(os.listdir(workdir)) == [".lock", "log.txt"]
      if opens_the_writer:
        exp.writer(0, 8)
        assert {"metrics.jsonl", "tb"} <= set(os.listdir(workdir))
      raise error
  assert os.listdir(tmp_path) == []


def test_a_workdir_made_by_a_run_the_mesh_refuses_is_removed(tmp_path):
  from sit_jax import experiment
  with pytest.raises(ValueError, match="eval_batch_size: Global batch size 12"):
    experiment.Experiment(_experiment_config(), str(tmp_path / "run"),
                          batch_sizes={"eval_batch_size": 12})
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("saves", ["config.json", "a metrics row", "cached features",
                                   "a file of the user's"])
def test_a_workdir_holding_what_was_saved_is_kept(tmp_path, saves):
  from sit_jax import experiment
  workdir = tmp_path / "run"
  with pytest.raises(ValueError):
    with experiment.Experiment(_experiment_config(), str(workdir)) as exp:
      writer = exp.writer(0, 8)
      if saves == "config.json":
        exp.write_config()
      elif saves == "a metrics row":
        writer.write_scalars(0, {"top1": 0.5}, timed=False)
      elif saves == "cached features":
        (workdir / "feature_cache").mkdir()
      else:
        (workdir / "tb" / "notes.txt").write_text("mine")
      raise ValueError("failed after saving")
  assert {".lock", "log.txt", "metrics.jsonl", "tb"} <= set(os.listdir(workdir))
  assert "ValueError: failed after saving" in (workdir / "log.txt").read_text()


def test_a_workdir_that_was_there_keeps_its_files(tmp_path):
  from sit_jax import experiment
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError):
    with experiment.Experiment(_experiment_config(), str(tmp_path)):
      raise ValueError("data.train_split='bogus'")
  assert sorted(os.listdir(tmp_path)) == [".lock", "log.txt", "notes.txt"]
  assert (tmp_path / "notes.txt").read_text() == "mine"


class _GcsfsHttpError(Exception):
  """gcsfs.retry.HttpError as GCS's answer to a request without credentials makes it: gcsfs
  finds none and asks as an anonymous caller."""

  def __init__(self, message):
    super().__init__(message, 401)
    self.code = 401


@pytest.mark.parametrize("error", [
    _GcsfsHttpError("Anonymous caller does not have storage.buckets.get access to the Google "
                    "Cloud Storage bucket."),
    OSError("Error executing an HTTP request: HTTP response code 401 with body '{\n \"error\": "
            "{\n  \"code\": 401,\n  \"message\": \"Anonymous caller does not have ...\"\n }\n}'"),
], ids=["gcsfs", "tensorflow_gfile"])
def test_a_remote_workdir_without_credentials_says_how_to_log_in(monkeypatch, error):
  """The line said to pass a --workdir one can write to, where logging in is the fix."""
  from etils.epath import gpath
  from sit_jax import experiment

  def anonymous(self, *args, **kwargs):
    raise error
  monkeypatch.setattr(gpath.PosixGPath, "mkdir", anonymous)
  with pytest.raises(PermissionError) as e:
    experiment.ensure_writable("gs://some-bucket/run")
  assert str(e.value).startswith("Workdir gs://some-bucket/run cannot be reached without valid "
                                 "Google credentials (")
  assert "gcloud auth application-default login" in str(e.value)
