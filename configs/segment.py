"""Semantic segmentation on a frozen pretrained ViT.

  python -m sit_jax.main --config=configs/segment.py:dataset=oxford_iiit_pet \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/segment.py:runlocal --config.init=/tmp/sit_local \
      --workdir=/tmp/segment

Patch tokens of the frozen backbone (seg.blocks, 1-based, concatenated; () = the last block)
-> a linear head (seg.head='linear', a 1x1 convolution) or a light one ('mlp': 3x3 convolution
of seg.hidden channels, GELU, 1x1) -> bilinear upsampling -> per-pixel cross-entropy, label 255
ignored. Images and label maps are cropped and flipped together on device. With several
seg.lr_scales one head per rate trains side by side on the same frozen tokens and validation
picks the head the test split scores (--config.seg.lr_scales='(0.25,1,4)'). Datasets:
oxford_iiit_pet (trimaps: pet, background, border), scene_parse150 (ADE20K as TFDS holds it:
the 100 object categories of its instance masks, stuff ignored, so not the 150-class benchmark;
TFDS's test split is ADE's validation set), a folder (--config.data.source=folder:/path
--config.data.num_classes=N; PATH[/SPLIT]/images/X.jpg + PATH[/SPLIT]/masks/X.png), and
embedded:digit_canvas (offline, runlocal). TFDS datasets must be built with
--file_format=array_record (random access). Results: DIR/results.json (mIoU, pixel accuracy,
per-class IoU, validation scores), DIR/images/segmentation_*.png (image | prediction | truth).
"""
from ml_collections import config_dict

from configs import common, transfer_common as tc

# Per dataset: image size, steps, global batch, base lr (per 256 images) of each head, classes.
# Starting points after DINOv2's linear segmentation protocol (AdamW, a linear head on the
# last block; 40k iterations at batch 16 for ADE20K at 512 px); only digit_canvas was tuned
# here, on its validation split, where the linear head wants a rate 64x the light head's
# (benchmarks/learning.md, "Dense features"): seg.lr_scales brackets each rate.
# Where it departs from DINOv2's (mmsegmentation) protocol, so that its mIoU is not DINOv2's:
# the whole image is squashed to image_size and scored there (DINOv2: short side 512, sliding
# 512 px windows, scored at the original resolution); training crops are random resized crops
# of that square with flips, no photometric distortion; the head has no BatchNorm on the tokens;
# cosine decay after warmup (DINOv2: 1,500 warmup iterations, then linear decay to 0).
RECIPES = {
    "oxford_iiit_pet": dict(image_size=224, steps=5000, batch=32,
                            base_lr=dict(linear=8e-3, mlp=8e-3), classes=3),
    "scene_parse150": dict(image_size=512, steps=40_000, batch=16,
                           base_lr=dict(linear=1.6e-2, mlp=1.6e-2), classes=100),
    "digit_canvas": dict(image_size=32, steps=600, batch=64,
                         base_lr=dict(linear=4.096, mlp=6.4e-2), classes=11),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="oxford_iiit_pet", head="linear")
  dataset = "digit_canvas" if arg.runlocal else arg.dataset
  r = tc.dataset_row(RECIPES, dataset)
  c = tc.transfer_config("segment", dataset)
  del c.head  # the tokens are seg.*'s
  # segment_data reads on threads of its own and squashes each image and mask to image_size
  # itself (bilinear, nearest): the other transfer configs' input keys would change nothing.
  del c.data.engine, c.data.workers, c.data.resize_mode, c.data.interpolation, c.data.resize_on
  del c.data.decoded_size
  c.data.image_size = r["image_size"]
  c.data.global_batch_size = r["batch"]
  c.data.num_classes = r["classes"]   # a folder source: the number of classes of its masks.
  c.data.crop_scale = (0.5, 1.0)      # random resized crops of image and labels together.
  c.eval_batch_size = 64
  c.total_epochs = 0
  c.total_steps = r["steps"]
  # optim.base_lr unset: the run takes seg.head's own rate from seg.base_lr, so that
  # --config.seg.head=mlp alone also changes the rate; --config.optim.base_lr=X sets it for
  # either head.
  c.optim = tc.optim_config("adamw", base_lr=config_dict.placeholder(float), weight_decay=1e-4,
                            warmup_epochs=1)
  c.seg = dict(
      blocks=(),          # 1-based blocks whose patch tokens are concatenated; (): the last.
      cls=False,          # append the CLS token to every patch token.
      head=arg.head,      # 'linear' or 'mlp' (also the config argument: segment.py:head=mlp).
      base_lr=dict(r["base_lr"]),  # each head's base rate, where optim.base_lr is unset.
      # 'raw_pixels': the same head on each patch's pixels (+ the whole image with cls), not
      # the backbone's tokens: the baseline row. With head 'mlp' set cls False: the whole
      # image's 3,072 channels make its 3x3 convolution too slow for a CPU.
      features="backbone",
      hidden=256,         # channels of the 'mlp' head's 3x3 convolution.
      # Factors of optim's learning rate, one head each, trained side by side on the same
      # frozen tokens (DINO's linear evaluation); validation picks the head that test scores,
      # so that each backbone is read at the rate that suits it (on the digit canvases the
      # best rate differed by 4x between backbones). Each head adds its upsampled logits to
      # the step's memory: (1.0,) trains one.
      lr_scales=(0.25, 1.0, 4.0),
      pictures=8,         # test images shown as image | prediction | truth.
  )
  c.eval_every = 0
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.data.global_batch_size = r["batch"]
    c.data.flip = False               # digits have a handedness.
    c.data.crop_scale = (0.5, 1.0)
    # Chosen on the validation split (SiT runlocal backbone, 600 steps, the linear head at
    # its rates): with the CLS token appended to each patch token 0.206 val mIoU, patch tokens
    # alone 0.161 (benchmarks/learning.md, "Dense features").
    c.seg.cls = True
    c.eval_batch_size = 128
    c.eval_every = 200
    c.checkpoint_every = 200
    c.log_every = 50
  return c
