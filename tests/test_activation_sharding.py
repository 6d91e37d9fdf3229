"""Activations follow the logical axis rules: FSDP and tensor parallelism really split the work.

The compiled per-device programs are inspected on 8 simulated CPU devices: what each device
holds (memory_analysis) and the shapes it computes on (the HLO text).
"""
import functools
import re

import jax
import numpy as np
import pytest

from configs import common, sit_vitb
from sit_jax import aot, pretrain, sharding
from test_pretrain_step import tiny_config

FAST = {"xla_backend_optimization_level": 0}  # buffer assignment (the memory) comes before.
BATCH = 48  # two views: 96 images of 17 tokens (16 patches + CLS), 3 heads, width 96.
DONOR_GROUP = BATCH // 8  # each view's images on one device of 8.
RESHARD = {"model.reshard_after_forward": True}  # what the `fsdp` config argument sets.


def compile_step(mesh_shape, rules, logical_axis_rules=sharding.LOGICAL_AXIS_RULES, batch=BATCH,
                 **overrides):
  """(memory figures, HLO text) of the step compiled for these devices. Several tests inspect the
  same program, so each is compiled once: overrides equal to tiny_config's values are dropped
  from the key. At BATCH, 'replace' takes its donors from groups within each device's images
  (as the recipes' `gmml.donor_group` does) unless overridden."""
  if batch == BATCH:
    overrides = {"gmml.donor_group": DONOR_GROUP, **overrides}
  defaults = tiny_config("sit")
  changed = {k: v for k, v in overrides.items()
             if functools.reduce(getattr, k.split("."), defaults) != v}
  return _compile_step(tuple(mesh_shape.items()), rules, logical_axis_rules, batch,
                       tuple(sorted(changed.items())))


@functools.lru_cache(maxsize=None)
def _compile_step(mesh_items, rules, logical_axis_rules, batch, override_items):
  mesh_shape, overrides = dict(mesh_items), dict(override_items)
  config = tiny_config("sit", **overrides)
  config.data.global_batch_size = batch
  config.mesh.update({"data": 1, "fsdp": 1, "model": 1, **mesh_shape})
  config.sharding_rules = rules
  config.logical_axis_rules = logical_axis_rules
  num_devices = int(np.prod(list(mesh_shape.values())))
  compiled, _ = aot.compile_train_step(config, jax.devices()[:num_devices], FAST)
  return aot.memory_figures(compiled), compiled.as_text()


def token_batch_sizes(hlo: str) -> set[int]:
  """Leading dimensions of the (batch, 17 tokens, ...) arrays the program computes on."""
  return {int(b) for b in re.findall(r"\[(\d+),17,", hlo)} - {1}


@pytest.fixture(scope="module")
def single_device():
  return compile_step({"data": 1}, common.REPLICATED)


# (mesh, rules, images per device, bound on temporaries and on arguments per device as a
# fraction of the single-device program's). Measured (MiB; single device: 75.7 temporaries,
# 7.44 arguments): fsdp 8: 11.2 / 1.01; data 2 x fsdp 4: 11.1 / 1.92; data 2 x model 3: 18.4 /
# 2.88. The batch split divides the activations; the model axis divides each block's heads and
# MLP features too (not the residual stream, LayerNorms and heads: 0.55x of the batch share
# here); FSDP divides the whole state by its axis, the model axis the blocks' kernels.
SPLITS = [({"fsdp": 8}, common.FSDP, 2 * BATCH // 8, 1.5 / 8, 1.5 / 8),
          ({"data": 2, "fsdp": 4}, common.FSDP, 2 * BATCH // 8, 1.5 / 8, 1.5 / 4),
          ({"data": 2, "model": 3}, common.TENSOR_PARALLEL, 2 * BATCH // 2, 0.7 / 2, 0.5)]


@pytest.mark.parametrize("mesh_shape, rules, per_device_batch, temp_bound, argument_bound", SPLITS)
def test_each_device_computes_and_holds_its_share(single_device, mesh_shape, rules,
                                                  per_device_batch, temp_bound, argument_bound):
  memory, hlo = compile_step(mesh_shape, rules)
  # Every token activation of the per-device program holds its share of the batch only.
  assert token_batch_sizes(single_device[1]) == {2 * BATCH}
  assert token_batch_sizes(hlo) == {per_device_batch}
  if "model" in mesh_shape:  # and its share of the heads: (batch, 17, 1 of 3 heads, 32).
    assert f"[{per_device_batch},17,1,32]" in hlo
    assert f"[{per_device_batch},17,3,32]" not in hlo
  # So memory per device falls with the device count. Before the blocks were constrained to the
  # batch, FSDP over 8 needed 31 MiB of temporaries: every device computed the whole batch.
  whole = single_device[0]
  assert memory["temp"] <= temp_bound * whole["temp"], (memory, whole)
  assert memory["argument"] <= argument_bound * whole["argument"], (memory, whole)


def test_fsdp_against_data_parallelism_on_the_same_devices():
  """Both split the batch 8 ways, so at 6 images per device their activations (the peak of the
  temporaries) are the same; FSDP splits the state as well. With the `fsdp` recipe's
  model.reshard_after_forward it adds to them only the gathered kernels of the layers in use;
  without, XLA keeps each forward-gathered kernel for the backward pass, every layer's at once.
  Measured (MiB per device): temporaries 9.5 data-parallel, 9.7 FSDP (11.2 without resharding),
  arguments 7.4 vs 1.0; all-gathers 71 (48): the backward's own, one per kernel product."""
  data_parallel, _ = compile_step({"data": 8}, common.REPLICATED)
  fsdp, fsdp_hlo = compile_step({"fsdp": 8}, common.FSDP, **RESHARD)
  kept, kept_hlo = compile_step({"fsdp": 8}, common.FSDP)
  assert fsdp["temp"] <= 1.05 * data_parallel["temp"] < kept["temp"], (fsdp, data_parallel, kept)
  assert len(all_gathers(fsdp_hlo)) >= len(all_gathers(kept_hlo)) + 4 * 4  # 4 blocks' 4 kernels.
  assert fsdp["argument"] <= 1.5 * data_parallel["argument"] / 8
  assert fsdp["total"] < data_parallel["total"], (fsdp, data_parallel)


def test_the_fsdp_recipe_needs_fewer_temporaries_than_data_parallelism():
  """configs/sit_vitb.py (B/16, batch 1024) on cpu:8, with and without its `fsdp` argument: where
  the state weighs beside the activations (the projection head alone is 19M parameters), FSDP's
  shards of the gradients outweigh the kernels it gathers. MiB per device, data parallel / FSDP /
  FSDP without reshard_after_forward (which keeps every gathered kernel for the backward pass):
  jax 0.10.2 11037 / 10793 / 11057, jax 0.11.2 9227 / 9087 / 9226. (S/16 ties on jax 0.11.2:
  4659 / 4662 / 4668; 5561 / 5512 / 5578 on 0.10.2.)"""
  assert sit_vitb.get_config("fsdp").model.reshard_after_forward
  assert not sit_vitb.get_config("fsdp,model=4").model.reshard_after_forward  # costs there.
  temporaries = {}
  for arg in ("", "fsdp"):
    compiled, _ = aot.compile_train_step(sit_vitb.get_config(arg or None), jax.devices(), FAST)
    temporaries[arg] = aot.memory_figures(compiled)["temp"]
  assert temporaries["fsdp"] < 0.995 * temporaries[""], temporaries


def all_gathers(hlo: str) -> list[str]:
  return re.findall(r" all-gather(?:-start)?\(", hlo)


def image_gathers(hlo: str) -> list[str]:
  """All-gathers of (16 x 16 x 3) images: of other devices' shares of the batch."""
  return re.findall(r"= \w+\[[\d,]*16,16,3\]\S* all-gather(?:-start)?\(", hlo)


@pytest.mark.parametrize("mesh_shape, rules", [({"fsdp": 8}, common.FSDP),
                                               ({"data": 8}, common.REPLICATED)])
def test_replace_donors_stay_on_their_device(mesh_shape, rules):
  """GMML's 'replace' copies blocks from a donor image. Drawn from the whole view, the donors
  need every device's images (all-gathers of whole views: bf16[1024,224,224,3] at B/16 batch
  1024); drawn from groups that lie within one device's 6 images of each view, none leave the
  device. The whole-view program, the control that such gathers are what image_gathers finds, is
  compiled on FSDP's mesh only: both meshes split the images alike (the batch over all 8 devices,
  sharding.BATCH_AXES), so their donor code is partitioned alike; one compile fewer."""
  if "fsdp" in mesh_shape:
    _, whole_view = compile_step(mesh_shape, rules, **{"gmml.donor_group": 0})
    assert image_gathers(whole_view)
  _, grouped = compile_step(mesh_shape, rules)  # groups of DONOR_GROUP
  assert not image_gathers(grouped)


@pytest.mark.parametrize("mesh_shape, rules", [({"fsdp": 8}, common.FSDP),
                                               ({"data": 8}, common.REPLICATED)])
def test_both_views_of_an_image_stay_on_its_device(mesh_shape, rules):
  """The network sees the views of each source image in adjacent rows (views_to_rows), so the
  device holding an image's crops computes on both of its views. With view 1 stacked over view 2
  the first devices computed on view 1 of every image and the others on view 2: three
  all-to-alls of the images per step (f32[1024,224,224,3] across the slice at B/16 batch 1024)."""
  _, hlo = compile_step(mesh_shape, rules)
  assert "all-to-all" not in hlo
  assert "collective-permute" not in hlo


def test_views_to_rows_puts_the_views_of_an_image_side_by_side():
  views = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (views, images, features)
  rows = pretrain.views_to_rows(views)
  np.testing.assert_array_equal(rows, [views[0, 0], views[1, 0], views[0, 1], views[1, 1],
                                       views[0, 2], views[1, 2]])
  np.testing.assert_array_equal(pretrain.rows_to_views(rows), views)


def test_donor_groups_across_devices_are_named():
  config = tiny_config("sit", **{"gmml.donor_group": 16})  # 2 x 16 images, 2 x 2 on each of 8.
  assert "span devices holding 2 images of each view" in pretrain.warn_if_donors_cross_devices(
      config, sharding.make_mesh({"data": 8}))
  assert pretrain.warn_if_donors_cross_devices(config, sharding.make_mesh({"data": 1},
                                                                          jax.devices()[:1])) is None
  config.gmml.donor_group = 2
  assert pretrain.warn_if_donors_cross_devices(config, sharding.make_mesh({"data": 8})) is None


def test_a_batch_the_devices_do_not_divide_names_a_mesh_that_keeps_it():
  """A run of batch 32 resumed on 6 devices (it must keep its batch): mesh.model=3 leaves a
  data-parallel size of 2, which divides 32; on 7 devices no model axis does."""
  for devices, advice in ((6, "use a multiple of 6, e.g. 30, or keep 32 with a model axis: "
                               "--config.mesh.model=3 (data-parallel size 2)."),
                          (7, "use a multiple of 7, e.g. 28.")):
    with pytest.raises(ValueError, match=re.escape(advice)):
      sharding.check_batch_size(32, sharding.make_mesh({"data": -1}, jax.devices()[:devices]))


def test_heads_that_do_not_divide_the_model_axis_are_one_clear_error():
  config = tiny_config("sit")
  config.mesh.update({"data": 4, "fsdp": 1, "model": 2})
  with pytest.raises(ValueError, match=re.escape(
      "ViT-Mu/4 has 3 attention heads, which the mesh cannot split 2 ways (logical axis 'heads'"
      " -> mesh model=2): use a product of those mesh axes that divides 3 (1, 3)")):
    aot.compile_train_step(config, jax.devices(), FAST)


@pytest.mark.parametrize("rules, message", [
    ((("tokens", "data"),), "unknown logical axes ['tokens']"),
    ((("batch", ("data", "pod")),), "unknown mesh axes ['pod']"),
])
def test_bad_logical_axis_rules_are_explained(rules, message):
  mesh = sharding.make_mesh({"data": 8})
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.jit(lambda x: x, mesh, rules)


def test_configs_default_logical_axis_rules_agree_with_sharding():
  assert common.LOGICAL_AXIS_RULES == sharding.LOGICAL_AXIS_RULES


def test_the_fsdp_recipe_turns_windowed_einsums_off_on_tpu_only():
  """configs/*:fsdp carries libtpu options (README, "FSDP and libtpu's windowed einsums"):
  compiled for a TPU they apply, on CPU (and GPU) they are left out, so the recipe runs here."""
  config = sit_vitb.get_config("fsdp")
  assert config.compiler_options == common.FSDP_COMPILER_OPTIONS
  assert sharding.compiler_options(config.compiler_options, "tpu") == {
      "xla_tpu_enable_windowed_einsum_for_all_gather": False,
      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
  assert sharding.compiler_options(config.compiler_options, "cpu") == {}
  assert sharding.compiler_options(config.compiler_options, "gpu") == {}
  assert sit_vitb.get_config(None).compiler_options == ""
  assert sit_vitb.get_config("fsdp,model=4").compiler_options == ""  # off saves nothing there.


@pytest.mark.parametrize("qkv_per_head", [False, True])
def test_tensor_parallel_qkv_per_head_keeps_each_device_on_its_heads(qkv_per_head):
  """The flat qkv kernel split over `model` gives each device a contiguous third of q|k|v, not
  its head, so GSPMD reshards the qkv output (rows, 17, 3, heads, 32) between devices, through
  6-d intermediates such as (rows, 17, 1, 3, 1, 32) (on TPU, B/16: the whole output on every
  chip). Per head (vit.QkvProjection) the kernel is resharded instead, and each device computes
  (rows, 17, 3, 1, 32) of its own head only."""
  _, hlo = compile_step({"data": 2, "model": 3}, common.TENSOR_PARALLEL,
                        **{"model.qkv_per_head": qkv_per_head})
  assert (re.search(r"\[\d+,17,\d,\d,\d,32\]", hlo) is None) == qkv_per_head
  assert re.search(r"\[\d+,17,3,1,32\]", hlo)
