"""The jitted SiT step: sharding invariance, FSDP placement, EMA, and that GMML actually learns."""
import functools

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from sit_jax import pretrain, sharding
from sit_jax.models import vit


def tiny_config(experiment="sit", **overrides):
  c = common.shrink_for_runlocal(common.pretrain_config())
  c.experiment = experiment
  c.data.image_size = 16
  c.data.global_batch_size = 16
  c.model.proj_hidden = 32
  c.model.proj_dim = 16
  c.optim.warmup_epochs = 0
  c.gmml.fills = ("noise", "replace")  # the paper's fills: donors from other images included.
  c.update_from_flattened_dict(overrides)  # 'optim.eps' -> c.optim.eps
  return c


def fake_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  shape = (config.data.global_batch_size, config.data.image_size, config.data.image_size, 3)
  return {"view1": rng.integers(0, 256, shape, dtype=np.uint8),
          "view2": rng.integers(0, 256, shape, dtype=np.uint8)}


def run_steps(config, mesh, num_steps=2, total_steps=100, edit_state=None, host_states=None):
  """(state, metrics of each step). `host_states`, a list, receives the state on the host before
  the first step and after each step (the step donates its input)."""
  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, total_steps, steps_per_epoch=10)
  tx = pretrain.build_optimizer(config, schedules)
  _, shardings, init = pretrain.state_layout(config, model, tx, mesh, jax.random.PRNGKey(0))
  state = init()
  if edit_state:
    state = jax.device_put(edit_state(state), shardings)
  step = pretrain.jit_train_step(pretrain.make_train_step(config, model, tx, schedules),
                                 shardings, mesh)
  if host_states is not None:
    host_states.append(jax.device_get(state))
  metrics = []
  for i in range(num_steps):
    state, m = step(state, sharding.global_batch(fake_batch(config, i), mesh))
    metrics.append(jax.device_get(m))
    if host_states is not None:
      host_states.append(jax.device_get(state))
  return state, metrics


# Adam divides by sqrt(v) + eps: with the default eps a near-zero gradient (e.g. the key bias,
# to which softmax is invariant) turns float reduction-order noise into a full +-lr step. A larger
# eps and lr make every update large against the tolerance and stable under summation order.
# Donor groups of 4 images: within one device's share on every mesh of the tests (8 devices).
INVARIANCE_OVERRIDES = {"optim.eps": 1e-4, "optim.base_lr": 0.02, "gmml.donor_group": 4}


def invariance_config(experiment):
  """tiny_config with INVARIANCE_OVERRIDES. GMML's runs also drop paths (runlocal does not), so
  that drop path's per-image keys are checked under sharding; SiT's do not, so that the scanned
  blocks (which draw their keys differently) compare with SiT's run."""
  drop_path = {"model.drop_path_rate": 0.1} if experiment == "gmml" else {}
  return tiny_config(experiment, **INVARIANCE_OVERRIDES, **drop_path)


@functools.lru_cache(maxsize=None)
def single_device_run(experiment):
  config = invariance_config(experiment)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  state, metrics = run_steps(config, mesh)
  return jax.device_get(state), metrics


@functools.lru_cache(maxsize=None)
def sharded_run(experiment, mesh_shape, rules):
  """Two steps of the invariance config on 8 devices: (host states before and after each step,
  metrics of each step). Shared by the tests below that look at the same run. FSDP as the
  `fsdp` config argument sets it: each kernel gathered again for the backward pass."""
  config = invariance_config(experiment)
  config.sharding_rules = getattr(common, rules)
  config.model.reshard_after_forward = rules == "FSDP"
  states = []
  _, metrics = run_steps(config, sharding.make_mesh(dict(mesh_shape)), host_states=states)
  return states, metrics


@pytest.mark.parametrize("experiment,mesh_shape,rules", [
    ("sit", (("data", 4), ("fsdp", 2)), "FSDP"),
    ("sit", (("data", 8), ("fsdp", 1)), "REPLICATED"),
    ("gmml", (("data", 2), ("fsdp", 4)), "FSDP"),
])
def test_sharded_step_equals_single_device_step(experiment, mesh_shape, rules):
  states, metrics = sharded_run(experiment, mesh_shape, rules)
  state = states[-1]
  ref_state, ref_metrics = single_device_run(experiment)
  for got, want in zip(metrics, ref_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    np.testing.assert_allclose(got["mask_fraction"], want["mask_fraction"], rtol=1e-6)
  flat = jax.tree_util.tree_leaves_with_path(state.params)
  ref = dict(jax.tree_util.tree_leaves_with_path(ref_state.params))
  for path, leaf in flat:
    want = ref[path]
    np.testing.assert_allclose(leaf, want, rtol=1e-4, atol=5e-5,  # updates are ~2.5e-3.
                               err_msg=jax.tree_util.keystr(path))
  assert int(state.step) == 2


def test_tensor_parallel_step_equals_single_device_step():
  # FSDP x TP: the data x TP layout is compiled in test_activation_sharding.py; one run of the
  # mix keeps the suite short. With the `model=N` recipe's qkv per head (vit.QkvProjection),
  # against the single device's nn.Dense: the same parameters, the same numbers.
  mesh_shape = {"fsdp": 2, "model": 3}
  config = invariance_config("sit")
  config.sharding_rules = common.TENSOR_PARALLEL
  config.model.qkv_per_head = True
  devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
  state, metrics = run_steps(config, sharding.make_mesh(mesh_shape, devices))
  qkv = state.params["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec[1] == "model"
  ref_state, ref_metrics = single_device_run("sit")
  for got, want in zip(metrics, ref_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                               jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5, err_msg=jax.tree_util.keystr(path))


def test_fsdp_rules_really_shard_the_large_kernels():
  config = tiny_config("sit")
  config.sharding_rules = common.FSDP
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, 100, 10)
  tx = pretrain.build_optimizer(config, schedules)
  _, _, init = pretrain.state_layout(config, model, tx, mesh, jax.random.PRNGKey(0))
  state = init()
  qkv = state.params["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]  # (96, 288)
  assert "fsdp" in tuple(qkv.sharding.spec)
  dim = list(qkv.sharding.spec).index("fsdp")
  assert qkv.addressable_shards[0].data.shape[dim] == qkv.shape[dim] // 2
  # Optimizer moments follow their parameters; the teacher too.
  mu = state.opt_state[1][0].mu["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert mu.sharding.spec == qkv.sharding.spec
  assert state.teacher["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"].sharding.spec == qkv.sharding.spec
  # Vectors stay replicated.
  assert tuple(state.params["backbone"]["norm"]["scale"].sharding.spec) == ()


def test_teacher_is_the_ema_of_the_student():
  # The first step of the 8-device data-parallel run of the sharding test above.
  (before, after, _), metrics = sharded_run("sit", (("data", 8), ("fsdp", 1)), "REPLICATED")
  config = tiny_config("sit", **INVARIANCE_OVERRIDES)
  chex_equal = jax.tree.map(np.array_equal, before.teacher,
                            {k: before.params[k] for k in before.teacher})
  assert all(jax.tree.leaves(chex_equal))  # the teacher starts as a copy of the student.
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, before.params, after.params)))
  schedules = pretrain.build_schedules(config, 100, 10)
  m = float(schedules.momentum(0))
  assert m == pytest.approx(config.teacher.momentum)
  expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, before.teacher,
                          {k: after.params[k] for k in before.teacher})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               after.teacher, expected)
  assert set(metrics[0]) >= {"loss", "recon", "contrastive", "lr", "weight_decay", "momentum"}
  np.testing.assert_allclose(metrics[0]["loss"], metrics[0]["contrastive"] + metrics[0]["recon"],
                             rtol=1e-5)


def test_gmml_has_no_teacher_and_contrastive_has_no_recon():
  mesh = sharding.make_mesh({"data": 8})
  for experiment, has_teacher in [("gmml", False), ("contrastive", True)]:
    config = tiny_config(experiment)
    model = pretrain.build_model(config)
    schedules = pretrain.build_schedules(config, 100, 10)
    tx = pretrain.build_optimizer(config, schedules)
    # The state's structure, traced without compiling its initialisation.
    state, _, _ = pretrain.state_layout(config, model, tx, mesh, jax.random.PRNGKey(0))
    assert bool(state.teacher) == has_teacher
    assert ("recon_head" in state.params) == (experiment == "gmml")
    # Only a corrupting experiment reports a mask fraction (contrastive's would be 0 always).
    step = pretrain.make_train_step(config, model, tx, schedules)
    _, metrics = jax.eval_shape(step, state, fake_batch(config))
    assert ("mask_fraction" in metrics) == (experiment == "gmml")
    assert ("recon" in metrics, "contrastive" in metrics) == (experiment == "gmml", has_teacher)


def test_gmml_learns_to_reconstruct_a_fixed_batch():
  config = tiny_config("gmml", **{"augment.preset": "none", "optim.base_lr": 0.03,
                                  "model.drop_path_rate": 0.0, "optim.clip_norm": 0.0,
                                  "gmml.fills": ("zeros",)})
  config.data.global_batch_size = 8
  # Learning, not sharding (tested above): one device runs the steps ~3x faster.
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, 1000, 10)
  tx = pretrain.build_optimizer(config, schedules)
  _, shardings, init = pretrain.state_layout(config, model, tx, mesh, jax.random.PRNGKey(0))
  state = init()
  # Smooth images (a masked pixel is predictable from its surroundings).
  yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  images = np.stack([128 + 100 * np.sin(xx / (2 + i % 3) + i) * np.cos(yy / (3 + i % 2))
                     for i in range(8)])
  images = np.repeat(images[..., None], 3, -1).astype(np.uint8)
  batch = sharding.global_batch({"view1": images, "view2": images[::-1].copy()}, mesh)
  # 200 steps: LLVM's optimisation, which the suite's XLA flags skip, pays for itself here.
  step = pretrain.jit_train_step(pretrain.make_train_step(config, model, tx, schedules),
                                 shardings, mesh).lower(state, batch).compile(
                                     {"xla_backend_optimization_level": "3"})
  recon = []
  for _ in range(200):
    state, m = step(state, batch)
    recon.append(float(m["recon"]))
  first, last = np.mean(recon[:10]), np.mean(recon[-10:])
  # Measured: 0.81 -> 0.50 after 100 steps, 0.45 after 200, 0.40 after 300.
  assert last < 0.65 * first, (first, last)


def test_scan_layers_step_equals_unrolled_step():
  # The unrolled run: SiT's FSDP run of the sharding test above (no drop path).
  mesh_shape = (("data", 4), ("fsdp", 2))
  states, want = sharded_run("sit", mesh_shape, "FSDP")
  config = invariance_config("sit")
  config.sharding_rules = common.FSDP
  config.model.reshard_after_forward = True
  config.model.scan_layers = True
  # The scanned run starts from the unrolled run's initial parameters, stacked.
  initial = states[0]
  stack = lambda tree: {**tree, "backbone": vit.stack_blocks(tree["backbone"])}
  scanned, got = run_steps(config, sharding.make_mesh(dict(mesh_shape)), edit_state=lambda state:
                           state.replace(params=stack(initial.params), teacher=stack(initial.teacher)))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=2e-5)
  stacked = scanned.params["backbone"]["blocks"]["block"]["attn"]["qkv"]["kernel"]
  assert stacked.shape[0] == 4 and tuple(stacked.sharding.spec)[0] is None  # layers not split.
  assert "fsdp" in tuple(stacked.sharding.spec)
  params = jax.device_get(scanned.params)
  params["backbone"] = vit.unstack_blocks(params["backbone"])
  chex.assert_trees_all_close(params, states[-1].params, rtol=1e-4, atol=5e-5)
  # Resuming a run with the other layout is refused, naming the setting.
  meta = [pretrain.checkpoint_metadata(tiny_config("sit", **{"model.scan_layers": s}))
          for s in (False, True)]
  assert meta[0]["model"]["scan_layers"] != meta[1]["model"]["scan_layers"]
  assert "remat" not in meta[0]["model"] and "dtype" not in meta[0]["model"]


@pytest.mark.parametrize("sizes", [{"fsdp": 0}, {"data": -2, "fsdp": -1}, {"model": 2.5}])
def test_mesh_sizes_must_be_positive_integers_or_minus_one(sizes):
  # Before: a zero was a ZeroDivisionError, 2.5 silently became a mesh of model=2.
  with pytest.raises(ValueError, match=r"integer >= 1, or -1"):
    sharding.make_mesh(sizes)


def test_bad_sharding_rules_fail_with_one_clear_line_and_unused_rules_warn(monkeypatch):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  tree = {"attn": {"qkv": {"kernel": jax.ShapeDtypeStruct((8, 4, 4, 16), np.float32)}},
          "norm": {"scale": jax.ShapeDtypeStruct((16,), np.float32)}}
  with pytest.raises(ValueError, match=r"rule 'fdsp' for attn/qkv/kernel: a rule is 'replicate'"):
    sharding.tree_shardings(tree, mesh, ((r"kernel$", "fdsp"),))  # was KeyError: 'f'
  with pytest.raises(ValueError, match=r"unknown mesh axes \['modle'\]"):
    sharding.tree_shardings(tree, mesh, ((r"kernel$", (None, None, None, "modle")),))
  warnings = []
  monkeypatch.setattr(sharding.logging, "warning", lambda *args: warnings.append(args))
  rules = ((r"qvk/kernel$", ("fsdp", None, None, None)), (r"scale$", "fsdp"),
           (r"norm/scale$", "replicate"), ("", "replicate"))
  placed = sharding.tree_shardings(tree, mesh, rules)
  assert placed["norm"]["scale"].spec == P("fsdp") and placed["attn"]["qkv"]["kernel"].spec == P()
  assert len(warnings) == 1 and warnings[0][1] == [r"qvk/kernel$", r"norm/scale$"]


def test_a_warmup_longer_than_the_run_is_reported(monkeypatch):
  warnings = []
  monkeypatch.setattr(pretrain.logging, "warning", lambda *args: warnings.append(args))
  config = tiny_config("sit", **{"optim.warmup_epochs": 10.0})
  schedules = pretrain.build_schedules(config, total_steps=6, steps_per_epoch=4)
  peak = 0.008 * 16 / 256  # runlocal base_lr, scaled.
  # np.linspace(0, peak, 40)[5]: the last step's lr, 5/39 of the peak.
  np.testing.assert_allclose(schedules.lr(5), peak * 5 / 39, rtol=1e-6)
  assert len(warnings) == 1 and warnings[0][2:] == (40, 6, 5 / 39)
  pretrain.build_schedules(config, total_steps=40, steps_per_epoch=4)
  assert len(warnings) == 1
