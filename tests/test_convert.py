"""timm ViT <-> sit_jax backbone conversion: same features, exact round trip, clear errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from sit_jax import checkpoint, convert  # noqa: E402
from sit_jax.models import vit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def timm_vit():
  torch.manual_seed(0)
  model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
  # timm starts biases and LayerNorms at 0 / 1: randomise them so the test sees every mapping.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(0.02 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def converted(timm_vit, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("timm") / "vit_s16.pth")
  # A training checkpoint as DINO/SiT write it: DDP prefix, backbone + head, student/teacher.
  student = {f"module.backbone.{k}": v for k, v in timm_vit.state_dict().items()}
  student["module.head.last_layer.weight"] = torch.zeros(8, 384)
  teacher = {f"backbone.{k}": v for k, v in timm_vit.state_dict().items()}
  teacher["head.mlp.0.weight"] = torch.zeros(8, 384)
  torch.save({"student": student, "teacher": teacher, "epoch": 3}, path)
  export = str(tmp_path_factory.mktemp("export"))
  config = convert.to_jax(path, export, overwrite=True)
  return export, config


def test_architecture_is_inferred(converted):
  _, config = converted
  assert config["variant"] == "S/16" and config["image_size"] == 224


def test_same_cls_features_as_timm(timm_vit, converted):
  export, _ = converted
  params, config = checkpoint.load_backbone(export)
  module = vit.backbone_from_config(config)
  images = np.random.RandomState(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = timm_vit.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))[:, 0].numpy()
  got = jax.jit(lambda p, x: module.apply({"params": p}, x)["cls"])(params["backbone"],
                                                                       jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_round_trip_is_exact_and_timm_loads_it(timm_vit, converted, tmp_path):
  export, config = converted
  params, _ = checkpoint.load_backbone(export)
  out = str(tmp_path / "back.safetensors")
  convert.to_timm(export, out)
  state = convert.load_file(out)
  model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  for k, v in timm_vit.state_dict().items():
    np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
  again, again_config = convert.torch_to_params(state)
  assert again_config["variant"] == config["variant"]
  jax.tree.map(np.testing.assert_array_equal, again, params["backbone"])
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype, again, params["backbone"]))
  assert all(leaves)


def test_unknown_and_missing_keys_are_listed(timm_vit):
  state = dict(timm_vit.state_dict())
  state["dist_token"] = torch.zeros(1, 1, 384)
  del state["blocks.3.attn.qkv.bias"]
  listed = r"missing \(1\): blocks\.3\.attn\.qkv\.bias.*unexpected \(1\): dist_token"
  with pytest.raises(convert.ConversionError, match=listed):
    convert.torch_to_params(state)
  with pytest.raises(convert.ConversionError, match="fc_norm"):
    convert.backbone_state({**state, "fc_norm.weight": torch.ones(384)})
  with pytest.raises(convert.ConversionError, match="No sit_jax variant"):
    convert.torch_to_params(state, num_heads=5)


def test_command_line_errors_name_the_problem(tmp_path):
  path = str(tmp_path / "odd.safetensors")
  from safetensors.numpy import save_file
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, path)
  proc = subprocess.run([sys.executable, "-m", "sit_jax.convert", "to-jax", f"--input={path}",
                         f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
  assert proc.returncode == 1
  assert "sit_jax.convert: error: Missing 'cls_token'" in proc.stderr
  assert "encoder.weight" in proc.stderr
