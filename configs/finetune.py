"""Fine-tuning a pretrained ViT with the DeiT recipe.

  python -m sit_jax.main --config=configs/finetune.py:dataset=cifar10 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/finetune.py:runlocal --workdir=/tmp/ft

AdamW with layer-wise lr decay, drop path 0.1, RandAugment m9/mstd0.5, random erasing 0.25,
Mixup 0.8 / CutMix 1.0, label smoothing 0.1; the position embedding is resized when
image_size differs from pretraining. Head: linear on CLS ('cls+mean' concatenates the mean
patch token). Results: DIR/results.json (top1, top5).
"""
from configs import common, transfer_common as tc

# Starting points from the DeiT / BEiT fine-tuning recipes for ViT-S/16 after self-supervised
# pretraining, not tuned on each dataset: epochs, global batch, base lr (per 256), layer decay.
RECIPES = {
    "imagenet2012": dict(image_size=224, epochs=100, batch=1024, base_lr=5e-4, layer_decay=0.75),
    "cifar10": dict(image_size=224, epochs=100, batch=512, base_lr=2.5e-4, layer_decay=0.75),
    "cifar100": dict(image_size=224, epochs=100, batch=512, base_lr=2.5e-4, layer_decay=0.75),
    "oxford_flowers102": dict(image_size=224, epochs=300, batch=256, base_lr=2.5e-4,
                              layer_decay=0.75),
    "oxford_iiit_pet": dict(image_size=224, epochs=300, batch=256, base_lr=2.5e-4,
                            layer_decay=0.75),
    "stl10": dict(image_size=224, epochs=200, batch=256, base_lr=2.5e-4, layer_decay=0.75),
    "digits": dict(image_size=32, epochs=10, batch=32, base_lr=2e-3, layer_decay=0.75),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="imagenet2012")
  dataset = "digits" if arg.runlocal else arg.dataset
  r = tc.dataset_row(RECIPES, dataset)
  c = tc.transfer_config("finetune", dataset)
  c.data.image_size = r["image_size"]
  c.data.global_batch_size = r["batch"]
  c.total_epochs = r["epochs"]
  c.model.drop_path_rate = 0.1
  c.head.features = "cls"
  c.optim = tc.optim_config("adamw", base_lr=r["base_lr"], weight_decay=0.05, warmup_epochs=5,
                            layer_decay=r["layer_decay"])
  c.augment = tc.deit_augment_config()
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.data.global_batch_size = 32
    c.total_epochs = 0
    c.total_steps = 50  # a smoke test: from random init the DeiT recipe needs far longer.
    c.optim.warmup_epochs = 0.2
    c.log_every = 10
  return c
