"""sit_jax.features: a backbone's features of your own images are the rows a k-NN run computes
for the same images, whatever form the backbone comes in."""
import importlib.util
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import knn as knn_config
from sit_jax import checkpoint, convert, data, features
from sit_jax.models import vit
from sit_jax.transfer import knn

MODEL = {"variant": "Mu/4", "image_size": 16, "standardize_input": True}
TEST_SPLIT = "test[:40]"


def random_backbone(seed):
  module = vit.backbone_from_config(MODEL)
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))["params"]
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory):
  """A backbone export, its parameters, and the test features of a k-NN run on it (its feature
  cache: digits resized from 32 to 16 px)."""
  tmp = tmp_path_factory.mktemp("features")
  params = random_backbone(1)
  export = checkpoint.export_backbone(tmp / "export", {"backbone": params}, MODEL)
  c = knn_config.get_config("runlocal")
  c.init, c.knn.k = export, (5,)
  c.data.train_split, c.data.val_split, c.data.test_split = "train[:64]", "train[64:96]", TEST_SPLIT
  c.baselines, c.tsne_points = False, 0
  knn.run(c, str(tmp / "knn"))
  for entry in (tmp / "knn" / "feature_cache").iterdir():
    with np.load(entry) as f:
      if json.loads(str(f["key"]))["split"] == TEST_SPLIT:
        return tmp, params, f["features"]
  raise AssertionError("no cached test features")


def held_out_digits():
  """The uint8 32 px images of TEST_SPLIT, in its order."""
  return data.embedded_digits()[0][data.dataset_info("embedded:digits", TEST_SPLIT).indices]


def test_features_of_a_workdir_a_step_and_an_export_are_the_knn_runs(knn_run):
  tmp, params, knn_features = knn_run
  other = random_backbone(2)
  with checkpoint.Checkpointer(tmp / "pre" / "checkpoints", every=1,
                             async_save=False) as ck:
    ck.save(1, {"params": {"backbone": other}, "teacher": {"backbone": params}},
            metadata={"model": MODEL, "experiment": "sit"})
    ck.save(2, {"params": {"backbone": params}, "teacher": {"backbone": other}},
            metadata={"model": MODEL, "experiment": "sit"})
  images = held_out_digits()
  for init, weights in ((tmp / "export", "student"), (tmp / "pre", "student"),
                        (tmp / "pre" / "checkpoints" / "1", "teacher")):
    extract = features.load(init, image_size=16, resize_mode="resize", weights=weights,
                            batch_size=128)
    np.testing.assert_allclose(extract(images), knn_features, rtol=0, atol=1e-5,
                               err_msg=f"{init} ({weights})")
  # Fewer images, in a list: a smaller batch, the same rows.
  np.testing.assert_allclose(extract(list(images[:3])), knn_features[:3], rtol=0, atol=1e-5)
  student_of_step_1 = features.load(tmp / "pre" / "checkpoints" / "1", image_size=16,
                                    resize_mode="resize")(images)
  assert np.abs(student_of_step_1 - knn_features).max() > 0.1


@pytest.mark.skipif(not importlib.util.find_spec("safetensors"), reason="needs safetensors")
def test_features_of_a_converted_checkpoint_are_the_knn_runs(knn_run):
  """timm state dict -> `convert to-jax`: the same features (standardize_input travels in the
  .safetensors metadata)."""
  tmp, params, knn_features = knn_run
  timm_file = str(tmp / "timm.safetensors")
  convert.save_state_dict(convert.params_to_timm(params), timm_file,
                          vit.parameter_settings(MODEL))
  convert.to_jax(timm_file, str(tmp / "converted"))
  extract = features.load(tmp / "converted", image_size=16, resize_mode="resize")
  np.testing.assert_allclose(extract(held_out_digits()), knn_features, rtol=0, atol=1e-5)


def test_bad_input_is_one_line_naming_what_to_pass(knn_run):
  tmp = knn_run[0]
  extract = features.load(tmp / "export", image_size=16, resize_mode="resize")
  images = held_out_digits()
  for bad, hint in ((images[0], r"one image\? pass images\[None\]"),
                    (images.transpose(0, 3, 1, 2), r"channels first\?"),
                    (images[..., 0], r"grey images\?"),
                    (images / 255.0, r"dtype float64: pass uint8 pixels"),
                    ([images[0], images[1, ..., 0]], r"image 1 of the list has shape \(32, 32\)")):
    with pytest.raises(ValueError, match=hint):
      extract(bad)
  assert extract(images[:0]).shape == (0, 96)
  # Image files' bytes are decoded as a folder's files are: a PNG gives its pixels' features.
  png = io.BytesIO()
  Image.fromarray(images[0]).save(png, format="PNG")
  np.testing.assert_array_equal(extract([png.getvalue(), images[1]]), extract(images[:2]))
  with pytest.raises(data.UnreadableImage, match=r"image 1 of the list: cannot identify"):
    extract([png.getvalue(), b"not an image"])
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    features.load(tmp / "nowhere", image_size=16)
  (tmp / "dino.pth").write_bytes(b"")
  with pytest.raises(ValueError, match=r"dino.pth is a file; .* python -m sit_jax.convert to-jax"):
    features.load(tmp / "dino.pth", image_size=16)
  with pytest.raises(ValueError, match="resize_mode='crop'"):
    features.load(tmp / "export", image_size=16, resize_mode="crop")
