"""Semantic segmentation on a frozen backbone: the metrics on hand-made label maps, the joint
augmentation, the batch order, the data sources, and a frozen pretrained backbone's linear
head beating random init on the offline digits."""
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import segment as segment_config
from sit_jax import checkpoint, config_check
from sit_jax.models import heads, vit
from sit_jax.transfer import common, segment, segment_data, supervised

IGNORE = segment_data.IGNORE


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------


def test_miou_and_pixel_accuracy_on_hand_made_label_maps():
  truth = np.array([[0, 0, 1, 1],
                    [0, 0, 1, 1],
                    [2, 2, IGNORE, IGNORE]])
  pred = np.array([[0, 1, 1, 1],
                   [0, 0, 1, 0],
                   [2, 0, 3, 3]])
  confusion = np.asarray(segment.confusion_matrix(jnp.asarray(pred), jnp.asarray(truth), 4))
  # Rows: truth, columns: prediction; the two IGNORE pixels are not counted.
  np.testing.assert_array_equal(confusion, [[3, 1, 0, 0],
                                            [1, 3, 0, 0],
                                            [1, 0, 1, 0],
                                            [0, 0, 0, 0]])
  scores = segment.segmentation_scores(confusion)
  # Class 0: 3 hits, union 4 + 5 - 3 = 6 -> 1/2. Class 1: 3 / (4 + 4 - 3) = 3/5.
  # Class 2: 1 / (2 + 1 - 1) = 1/2. Class 3: neither labelled nor predicted -> left out.
  assert scores["iou"] == pytest.approx([0.5, 0.6, 0.5, None], nan_ok=True)
  assert scores["mIoU"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)
  assert scores["pixel_accuracy"] == pytest.approx(7 / 10)
  assert scores["unlabelled"] == [3]


def test_a_class_predicted_but_never_labelled_counts_zero_and_padding_is_left_out():
  truth = jnp.array([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
  pred = jnp.array([[[0, 2], [0, 0]], [[0, 0], [0, 0]]])
  # The second example is padding (valid False): only the first one counts.
  confusion = segment.confusion_matrix(pred, truth, 3, valid=jnp.array([True, False]))
  scores = segment.segmentation_scores(confusion)
  assert scores["iou"] == pytest.approx([0.75, None, 0.0], nan_ok=True)
  assert scores["mIoU"] == pytest.approx(0.375)
  assert scores["pixel_accuracy"] == pytest.approx(0.75)


def test_pixel_cross_entropy_leaves_ignored_pixels_out():
  logits = jnp.log(jnp.array([[[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8], [0.3, 0.7]]]]))
  labels = jnp.array([[[0, IGNORE], [1, IGNORE]]])
  want = -(np.log(0.5) + np.log(0.8)) / 2
  assert float(segment.pixel_cross_entropy(logits, labels)) == pytest.approx(want, rel=1e-6)


def test_picture_legend_names_the_classes_shown():
  images = np.zeros((2, 16, 16, 3), np.uint8)
  predictions = np.zeros((2, 16, 16), np.int32)
  predictions[0, :4] = 3
  labels = predictions.copy()
  labels[1, :2] = segment_data.IGNORE
  grid = segment.picture_grid(images, predictions, labels, 5, ("bg", "a", "b", "c", "d"))
  colours = segment.palette(5)
  side = 96  # 16 px cells zoomed to at least 96
  assert grid.shape == (2 * side + 2, 3 * side + 4 + 120, 3)
  np.testing.assert_array_equal(grid[0, side + 2], colours[3])  # a predicted pixel of class 3
  # Swatches, in class order: class 0, class 3, then 'not scored' (IGNORE's white).
  swatch = lambda i: grid[i * segment.LEGEND_ROW + 6, 3 * side + 4 + 8]
  for i, colour in enumerate([colours[0], colours[3], colours[5]]):
    np.testing.assert_array_equal(swatch(i), colour)
  assert (grid[3 * segment.LEGEND_ROW:, 3 * side + 4:] == 255).all()  # nothing more listed
  # More classes than rows: the last row counts the rest (no swatch).
  many = segment.legend([((1, 2, 3), str(c)) for c in range(30)], height=5 * segment.LEGEND_ROW)
  np.testing.assert_array_equal(many[3 * segment.LEGEND_ROW + 6, 8], (1, 2, 3))
  assert (many[4 * segment.LEGEND_ROW + 2:4 * segment.LEGEND_ROW + 12, 4:14] == 255).all()


def test_palette_tells_classes_apart():
  """Class 0 black, 1-20 Tableau's 20 colours strong ones first (as matplotlib lists them), the
  rest the VOC devkit's colour map (VOCdevkit/VOCcode/VOClabelcolormap.m, written here from its
  bitget loop); all 255 colours distinct, and white (IGNORE's) for no class."""
  tableau = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
             (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
             (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
             (219, 219, 141), (158, 218, 229)]

  def voc(i):
    r = g = b = 0
    for j in range(8):
      r |= ((i >> 0) & 1) << (7 - j)
      g |= ((i >> 1) & 1) << (7 - j)
      b |= ((i >> 2) & 1) << (7 - j)
      i >>= 3
    return r, g, b

  colours = segment.palette(255)
  np.testing.assert_array_equal(colours[:21], [(0, 0, 0)] + tableau)
  np.testing.assert_array_equal(colours[21:255], [voc(i) for i in range(21, 255)])
  assert len({tuple(c) for c in colours}) == 256 and tuple(colours[-1]) == (255, 255, 255)
  np.testing.assert_array_equal(segment.palette(3), [(0, 0, 0)] + tableau[:2] + [(255,) * 3])


def test_heads_on_the_token_grid():
  tokens = jnp.ones((2, 4, 4, 6))
  for hidden, names in ((0, {"classifier"}), (8, {"conv", "classifier"})):
    head = segment.SegmentationHead(5, hidden)
    params = head.init(jax.random.PRNGKey(0), tokens)["params"]
    assert set(params) == names
    logits = segment.upsample(head.apply({"params": params}, tokens), 16)
    assert logits.shape == (2, 16, 16, 5)
    np.testing.assert_array_equal(logits, 0.0)  # a zero-initialised classifier: uniform start


def test_heads_side_by_side_train_as_each_would_alone():
  """seg.lr_scales: the stacked heads' parameters after a few steps equal those of one-head runs
  at each rate (per-tensor clipping on, so that a clip shared across the heads would show)."""
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  backbone = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  patch_fn = common.make_patch_fn(module, (4,), True)
  head = segment.SegmentationHead(11, 8)
  images, labels = segment_data.digit_masks("train")
  batch = {"image": jnp.asarray(images[:16]), "label": jnp.asarray(labels[:16])}
  one = head.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 2 * module.width)))["params"]

  def train(scales, steps=3):
    c = segment_config.get_config("runlocal")
    c.seg.lr_scales, c.optim.clip_norm = scales, 0.05
    tx = supervised.make_optimizer(c, 1e-2)
    params = jax.tree.map(lambda x: jnp.stack([x] * len(scales)), one)
    state = supervised.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=jax.vmap(tx.init)(params),
                                  rng=jax.random.PRNGKey(2))
    step = jax.jit(segment.make_train_step(patch_fn, head, tx, c, 16))
    for _ in range(steps):
      state, metrics = step(state, backbone, batch)
    return state.params, float(metrics["loss"])

  together, mean_loss = train((0.5, 2.0))
  alone = [train((0.5,)), train((2.0,))]
  # Adam divides each gradient by its own size, so an element whose gradient is at float32's
  # rounding level can move by a rounding-sized fraction of a step: allow 1e-3 of the larger
  # rate's step (2e-2), not 1e-6 (jax 0.11 rounds one element 2e-6 apart).
  for i, (params, _) in enumerate(alone):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], together),
                                jax.tree.map(lambda x: x[0], params), rtol=1e-5, atol=2e-5)
  assert mean_loss == pytest.approx(np.mean([loss for _, loss in alone]), rel=1e-5)
  # The rates matter: the two heads moved apart.
  assert not np.allclose(together["classifier"]["kernel"][0], together["classifier"]["kernel"][1])


def test_each_head_trains_at_its_own_rate_unless_one_is_given():
  rates = segment_config.RECIPES["digit_canvas"]["base_lr"]
  assert rates["linear"] != rates["mlp"]
  for head, arg in (("linear", "runlocal"), ("mlp", "runlocal,head=mlp")):
    by_argument = segment_config.get_config(arg)
    by_key = segment_config.get_config("runlocal")
    by_key.seg.head = head                     # --config.seg.head=HEAD
    for c in (by_argument, by_key):
      assert c.optim.base_lr is None
      config_check.check(c)
      assert segment.with_head_rate(c).optim.base_lr == rates[head]
      assert c.optim.base_lr is None           # the caller's config is left as it was.
    by_key.optim.base_lr = 0.5                 # --config.optim.base_lr: both heads take it.
    assert segment.with_head_rate(by_key).optim.base_lr == 0.5
  # Unset is only for segmentation, which has the heads' rates to fall back on.
  knn_like = ml_collections.ConfigDict({"optim": {"base_lr": None}, "total_steps": 1})
  with pytest.raises(config_check.ConfigError, match="optim.base_lr is unset"):
    config_check.check(knn_like)


def test_validation_picks_the_head_and_a_tie_the_first():
  assert segment.best_head([0.2, 0.4, 0.3]) == 1
  assert segment.best_head([0.4, 0.4]) == 0
  assert segment.best_head([float("nan"), 0.1]) == 1
  # Without a validation split: the key, before any work (it was "folder:... has no / folder
  # for split ''", naming no key).
  c = segment_config.get_config("runlocal")
  c.data.val_split = ""
  with pytest.raises(config_check.ConfigError, match="data.val_split is empty: segment chooses"):
    config_check.check(c)


def test_raw_pixel_tokens_are_each_patch_and_the_whole_image():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  tokens = common.make_pixel_patch_fn(4)(None, images)
  assert tokens.shape == (2, 2, 2, 4 * 4 * 3)
  for b, row, col in ((0, 0, 0), (1, 0, 1), (1, 1, 0)):  # token (row, col) = that 4x4 patch
    patch = np.asarray(images[b, 4 * row:4 * row + 4, 4 * col:4 * col + 4])
    np.testing.assert_array_equal(tokens[b, row, col], patch.reshape(-1))
  with_image = common.make_pixel_patch_fn(4, whole_image=True)(None, images)
  assert with_image.shape == (2, 2, 2, 48 + 192)
  np.testing.assert_array_equal(with_image[..., :48], tokens)
  np.testing.assert_array_equal(with_image[1, 1, 1, 48:], np.asarray(images[1]).reshape(-1))


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def test_augmentation_moves_image_and_labels_together():
  rng = np.random.default_rng(0)
  labels = np.kron(rng.integers(0, 5, (4, 4, 4)), np.ones((1, 8, 8))).astype(np.uint8)
  images = np.repeat((labels * 50)[..., None], 3, axis=-1).astype(np.uint8)
  aug_images, aug_labels = jax.jit(segment_data.augment_pair, static_argnums=(3, 4))(
      jax.random.PRNGKey(3), images, labels, (0.2, 1.0), True)
  aug_images, aug_labels = np.asarray(aug_images), np.asarray(aug_labels)
  assert aug_labels.dtype == np.uint8 and aug_images.shape == images.shape
  assert not np.array_equal(aug_labels, labels)  # something moved
  # Away from the edges between regions (where bilinear blends), each pixel keeps its label.
  grey = aug_images[..., 0]
  inside = np.ones_like(aug_labels, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      inside &= np.roll(aug_labels, (dy, dx), axis=(1, 2)) == aug_labels
  assert inside.mean() > 0.5
  np.testing.assert_allclose(grey[inside], aug_labels[inside] * 50.0, atol=1.0)


def test_train_batches_are_a_function_of_seed_process_and_step():
  n, batch = 50, 8
  halves = [segment_data.train_indices(n, batch, seed=1, step=9, process_index=p,
                                       process_count=2) for p in (0, 1)]
  whole = segment_data.train_indices(n, batch, seed=1, step=9, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.concatenate(halves), whole)
  # Six steps of 8 walk through one permutation of 50 (48 distinct examples).
  epoch = np.concatenate([segment_data.train_indices(n, batch, 1, s, 0, 1) for s in range(6)])
  assert len(set(epoch.tolist())) == 48


def test_digit_canvases_label_the_digits_they_show():
  images, labels = segment_data.digit_canvases("test")
  assert images.shape == (500, 32, 32, 3) and labels.shape == (500, 32, 32)
  classes = set(np.unique(labels).tolist())
  assert classes <= set(range(11)) | {IGNORE} and len(classes) == 12
  digit = (labels > 0) & (labels != IGNORE)
  assert images[..., 0][digit].mean() > 100 > images[..., 0][labels == 0].mean()
  data = segment_data.open_split("embedded:digit_canvas", "train[80%:]")
  assert data.num_examples == 300 and data.num_classes == 11


def test_digit_canvas_splits_share_no_digit():
  """The validation canvases (train[80%:]) choose the head's rate: none of their digits may be
  in a training canvas, nor in a test canvas; the training ones are embedded:digits'
  train[:80%], the bank of the k-NN and linear evaluations."""
  from sit_jax import data as image_data
  layout = segment_data.canvas_layout("train")
  digits_of = lambda split: {d for i in segment_data._slice(split, len(layout))[1]
                             for d, *_ in layout[i]}
  train, val = digits_of("train[:80%]"), digits_of("train[80%:]")
  test = {d for pasted in segment_data.canvas_layout("test") for d, *_ in pasted}
  assert not train & val and not (train | val) & test
  order = np.random.default_rng(0).permutation(1797)  # embedded:digits' order
  bank = set(order[image_data.slice_indices(1500, ":80%", "train[:80%]")].tolist())
  assert train <= bank and len(train) > 800  # of 1,200: each canvas draws 1-2 at random


def test_folder_of_image_mask_pairs(tmp_path, caplog):
  from PIL import Image
  from sit_jax import data as image_data
  for split, count in (("train", 3), ("test", 2)):
    for sub in ("images", "masks"):
      os.makedirs(tmp_path / split / sub)
    for i in range(count):
      Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(
          tmp_path / split / "images" / f"{i}.jpg")
      Image.fromarray(np.full((10, 12), i, np.uint8)).save(tmp_path / split / "masks" / f"{i}.png")
  data = segment_data.open_split(f"folder:{tmp_path}", "test", num_classes=3)
  assert data.num_examples == 2
  batches = list(segment_data.EvalBatches(data, global_batch_size=4, image_size=8))
  assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, False, False]
  assert batches[0]["label"].shape == (4, 8, 8)
  assert sorted(np.unique(batches[0]["label"][:2]).tolist()) == [0, 1]
  with pytest.raises(segment_data.SegmentationDataError, match="num_classes"):
    segment_data.open_split(f"folder:{tmp_path}", "train")
  # Class 256 would wrap to 0 in the one byte a label map holds per pixel.
  with pytest.raises(segment_data.SegmentationDataError, match=r"num_classes=256: .* 1..255"):
    segment_data.open_split(f"folder:{tmp_path}", "train", num_classes=256)
  # Every mask is checked when the split opens, before any work: a value that is no class, a
  # colour mask, one of another shape than its image (a turned image; a pixel off is squashed
  # with it), a JPEG (edges move to neighbouring classes). The file and the fix, not a NaN loss.
  masks = tmp_path / "test" / "masks"
  bad = {"0.png": (np.full((10, 12), 7, np.uint8),
                   r"0.png holds the value 7, not a class of data.num_classes=3"),
         "1.png": (np.zeros((10, 12, 3), np.uint8), "1.png has 3 channels"),
         "1.jpg": (np.zeros((10, 12), np.uint8), "1 of its masks are JPEG"),
         "0.bmp": (np.zeros((12, 10), np.uint8), r"0.bmp is 10x12 px, its image .*0.jpg 12x10")}
  for name, (mask, error) in bad.items():
    os.rename(masks / f"{name[0]}.png", tmp_path / "kept.png")
    Image.fromarray(mask).save(masks / name)
    with pytest.raises(segment_data.SegmentationDataError, match=error):
      segment_data.open_split(f"folder:{tmp_path}", "test", num_classes=3)
    os.remove(masks / name)
    os.rename(tmp_path / "kept.png", masks / f"{name[0]}.png")
  Image.fromarray(np.full((11, 12), 1, np.uint8)).save(masks / "1.png")
  # An image without a mask is left out, with a warning.
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "test" / "images" / "2.jpg")
  with caplog.at_level("WARNING"):
    data = segment_data.open_split(f"folder:{tmp_path}", "test", num_classes=3)
  assert data.num_examples == 2 and "1 of its 3 images have no mask" in caplog.text
  assert data.load(1)[1].shape == (11, 12)
  # A file that cannot be decoded is named: a mask (or an image's header) when the split opens,
  # an image where it is loaded (a traceback without the file's name before).
  image = (tmp_path / "test" / "images" / "0.jpg").read_bytes()
  (tmp_path / "test" / "images" / "0.jpg").write_bytes(image[:-100])
  with pytest.raises(segment_data.SegmentationDataError, match=r"0.jpg cannot be read \("):
    data.load(0)
  (tmp_path / "test" / "images" / "0.jpg").write_bytes(image)
  (tmp_path / "test" / "masks" / "1.png").write_bytes(b"not a png")
  with pytest.raises(segment_data.SegmentationDataError, match=r"1.png cannot be read \("):
    segment_data.open_split(f"folder:{tmp_path}", "test", num_classes=3)
  # No val/ folder: the validation split is a slice of train, never the whole folder.
  with pytest.raises(image_data.SplitNotFound, match="its split folders are test, train"):
    segment_data.open_split(f"folder:{tmp_path}", "val", num_classes=3)


# ---------------------------------------------------------------------------------------------
# A frozen pretrained backbone against random init.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A Mu/4 backbone pretrained for 200 steps to classify the 16 px train digits from its CLS
  token (image labels only, no pixel labels), exported as pretraining exports."""
  images, label_maps = segment_data.digit_masks("train")
  digits = np.array([np.max(np.where(m == IGNORE, 0, m)) - 1 for m in label_maps])
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  head = heads.ClassifierHead(10, "cls")
  rng = jax.random.PRNGKey(0)
  params = {"backbone": module.init(rng, jnp.zeros((1, 16, 16, 3)))["params"]}
  params["head"] = head.init(rng, module.apply({"params": params["backbone"]},
                                               jnp.zeros((1, 16, 16, 3))))["params"]
  tx = optax.adam(2e-3)

  # 200 steps: LLVM's optimisation, which the suite's XLA flags skip, pays for itself here
  # (about 13 s of steps against 21 s, 0.5 s more compile).
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": "3"})
  def step(params, opt_state, x, y):
    def loss(p):
      logits = head.apply({"params": p["head"]},
                          module.apply({"params": p["backbone"]}, common.to_input(x)))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  order = np.random.default_rng(0)
  for _ in range(200):  # segmentation test mIoU 0.57 against random init's 0.23
    idx = order.integers(0, len(images), 64)
    params, opt_state = step(params, opt_state, images[idx], digits[idx])
  return checkpoint.export_backbone(tmp_path_factory.mktemp("export") / "backbone",
                                    {"backbone": jax.tree.map(np.asarray, params["backbone"])},
                                    {"variant": "Mu/4", "image_size": 16})


def small_config(init):
  """The digits alone at 16 px, their shapes labelled with the digit: the head needs to know
  which digit it sees, which the CLS token appended to each patch token tells it."""
  c = segment_config.get_config("runlocal")
  c.init = str(init)
  c.data.source, c.data.image_size = "embedded:digit_masks", 16
  c.data.train_split, c.data.val_split, c.data.test_split = ("train[:1200]", "train[1200:]",
                                                             "test")
  c.seg.cls, c.seg.lr_scales = True, (1.0,)
  c.total_steps, c.eval_every, c.log_every, c.checkpoint_every = 150, 75, 75, 150
  return c


def test_frozen_pretrained_backbone_beats_random_init(tmp_path, pretrained, monkeypatch, caplog):
  config = small_config(pretrained)
  # config.compiler_options reach XLA for the training step, and for it alone (beside the
  # identity that checks them before any work).
  config.compiler_options = f"xla_dump_to={tmp_path / 'xla'}"
  trained = segment.run(config, str(tmp_path / "pretrained"))
  assert {name.split(".")[1] for name in os.listdir(tmp_path / "xla")} == {
      "jit_step", "jit_compiler_options_check"}
  two_rates = small_config("")
  two_rates.seg.lr_scales = (1.0, 4.0)
  # A picture that cannot be drawn (here a matplotlib that will not import) is one warning: the
  # run ended in its traceback, after training and scoring test, without results.json.
  def broken_matplotlib(num_classes):
    raise ImportError("no matplotlib here")
  monkeypatch.setattr(segment, "palette", broken_matplotlib)
  random = segment.run(two_rates, str(tmp_path / "random"))
  monkeypatch.undo()
  assert "Segmentation picture not drawn: no matplotlib here" in caplog.text
  with open(tmp_path / "random" / "results.json") as f:
    assert json.load(f)["mIoU"] == random["mIoU"]
  assert not os.path.exists(tmp_path / "random" / "images")
  assert trained["mIoU"] > random["mIoU"] + 0.3, (trained["mIoU"], random["mIoU"])
  assert trained["pixel_accuracy"] > random["pixel_accuracy"]
  # Two heads: validation's best is the one test scored, and it is named in the results.
  val = random["validation"]
  per_head = [val["val/mIoU_at_x1"], val["val/mIoU_at_x4"]]
  assert random["lr_scale"] == (1.0, 4.0)[int(np.argmax(per_head))]
  assert val["val/mIoU"] == max(per_head) and "chosen on validation" in random["protocol"]
  assert trained["lr_scales"] == [1.0] and trained["lr_scale"] == 1.0

  with open(tmp_path / "pretrained" / "config.json") as f:
    assert json.load(f)["optim"]["base_lr"] == segment_config.RECIPES["digit_canvas"][
        "base_lr"]["linear"]                   # the head's rate the run used, not unset.
  with open(tmp_path / "pretrained" / "results.json") as f:
    saved = json.load(f)
  assert saved["mIoU"] == trained["mIoU"] and saved["num_examples"] == 297
  assert set(saved["iou"]) == {"background", *map(str, range(10))}
  assert saved["validation"]["split"] == "train[1200:]" and "val/mIoU" in saved["validation"]
  assert saved["figures"]["test mIoU"] == trained["mIoU"] and saved["protocol"]
  with open(tmp_path / "pretrained" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  # eval_every scores the validation split; the test split appears once, at the end.
  assert [r["step"] for r in rows if "val/mIoU" in r] == [75, 150]
  assert [r["step"] for r in rows if "test/mIoU" in r] == [150]
  assert os.listdir(tmp_path / "pretrained" / "images") == ["segmentation_0000150.png"]
  # Started again, the finished run scores test again and keeps one row per step.
  assert segment.run(small_config(pretrained), str(tmp_path / "pretrained"))["mIoU"] == \
      trained["mIoU"]
  with open(tmp_path / "pretrained" / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == rows


def test_tfds_label_maps(monkeypatch):
  """Pets trimaps 1/2/3 -> 0/1/2; TFDS's ADE20K masks (the instance task's 100 categories in the
  red channel) 0 -> IGNORE, k -> k - 1 (read through a stand-in for tfds.data_source: no
  dataset is prepared here)."""
  import tensorflow_datasets as tfds
  image = np.zeros((2, 3, 3), np.uint8)
  examples = {
      "oxford_iiit_pet": [{"image": image, "segmentation_mask": np.array(
          [[[1], [2], [3]], [[3], [2], [1]]], np.uint8)}],
      "scene_parse150": [{"image": image, "annotation": np.stack(
          [np.array([[0, 1, 100], [4, 0, 150]], np.uint8)] * 3, axis=-1)}],
  }
  monkeypatch.setattr(tfds, "data_source", lambda name, **kw: examples[name])
  pets = segment_data.open_split("tfds:oxford_iiit_pet", "train[:90%]")
  assert pets.num_classes == 3 and pets.class_names == ("pet", "background", "border")
  np.testing.assert_array_equal(pets.load(0)[1], [[0, 1, 2], [2, 1, 0]])
  ade = segment_data.open_split("tfds:scene_parse150", "test")
  assert ade.num_classes == 100  # 4 is 'person' there, not ADE-150's 'floor' (index 3)
  np.testing.assert_array_equal(ade.load(0)[1], [[IGNORE, 0, 99], [3, IGNORE, IGNORE]])

  def no_such_split(name, split, **kw):
    raise ValueError(f"Unknown split {split!r}. Should be one of ['train', 'test'].")
  monkeypatch.setattr(tfds, "data_source", no_such_split)
  with pytest.raises(segment_data.SegmentationDataError, match="has no split 'validation'"):
    segment_data.open_split("tfds:scene_parse150", "validation")  # not: "prepare it with"


@pytest.mark.parametrize("dataset", ["oxford_iiit_pet", "scene_parse150"])
def test_tfds_rows_name_splits_their_builder_makes(dataset, tmp_path):
  """The config's splits are among those the TFDS builder's own code generates (its downloads
  stubbed: nothing is fetched). scene_parse150 has 'train' and 'test' only."""
  import re
  import tensorflow_datasets as tfds

  class NoDownloads:
    def download_and_extract(self, urls):
      return {k: str(tmp_path) for k in urls}

  config = segment_config.get_config(f"dataset={dataset}")
  builder = tfds.builder(config.data.source.removeprefix("tfds:"), data_dir=str(tmp_path))
  made = {str(g.name) for g in builder._split_generators(NoDownloads())}
  for key in ("train_split", "val_split", "test_split"):
    assert re.match(r"\w+", config.data[key]).group() in made, (key, config.data[key], made)
