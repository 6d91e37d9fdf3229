"""SiT pretraining on a small dataset, with the paper's small-data settings.

  --config=configs/sit_small.py:dataset=cifar10      (cifar10, cifar100, stl10, flowers, pets)

Small data: alpha = 5 (reconstruction weighted up), long schedules, ViT-S/16 on 224 px
(images are upscaled by the crop), global batch 256. STL-10 pretrains on train + unlabelled (105,000 images) for 1,000 epochs, not the paper's
3,000 for small data: 410,000 steps, fewer than CIFAR's 585,000 (the authors' code has no
STL-10 setting; 3,000 epochs there would be 1.23 million steps).
"""
from configs import common

# dataset: (TFDS source, pretraining split, epochs, k-NN monitor: labelled bank, held-out split,
# evaluation view as configs/knn.py)
DATASETS = {
    "cifar10": ("tfds:cifar10", "train", 3000, "train", "test", "resize"),
    "cifar100": ("tfds:cifar100", "train", 3000, "train", "test", "resize"),
    "stl10": ("tfds:stl10", "train+unlabelled", 1000, "train", "test", "resize"),
    "flowers": ("tfds:oxford_flowers102", "train+validation", 3000, "train+validation", "test",
                "center_crop"),
    "pets": ("tfds:oxford_iiit_pet", "train", 3000, "train", "test", "center_crop"),
}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="cifar10")
  if args.dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {args.dataset!r} for sit_small: choose one of "
                     f"{sorted(DATASETS)}.")
  source, split, epochs, bank, held_out, view = DATASETS[args.dataset]
  c = common.pretrain_config()
  c.experiment = "sit"
  c.data.source = source
  c.data.split = split
  c.total_epochs = epochs
  c.loss.alpha = 5.0
  c.checkpoint_every = 2000
  # Watch the features learn: k-NN top-1 on the test split every 5,000 steps (25 epochs of
  # CIFAR at batch 256; a few seconds to a minute on one accelerator).
  c.eval_every = 5000
  c.eval.train_split, c.eval.test_split, c.eval.resize_mode = bank, held_out, view
  if args.runlocal:
    c = common.shrink_for_runlocal(c)
  return c
