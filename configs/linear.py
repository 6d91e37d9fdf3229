"""Linear probe of a frozen pretrained ViT.

  python -m sit_jax.main --config=configs/linear.py:dataset=cifar10 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/linear.py:runlocal --workdir=/tmp/linear

Features: CLS of the last `head.last_blocks` blocks concatenated (DINO uses 4 for ViT-S), plus
the mean patch token with head.features='cls+mean'. With linear.cache_features the features
are extracted once (no augmentation) and standardised, and the head is a logistic regression
fitted to convergence by full-batch L-BFGS (linear.solver='lbfgs', the features sharded over
the devices, or on one device below 4096 examples per device), its L2 penalty chosen among
linear.l2 on a held-out linear.val_fraction of the train features; linear.solver='sgd' trains it
with config.optim on mini-batches instead.
Without caching every step crops and flips on the host and runs the frozen backbone (DINO's
SGD protocol). With baselines=True (on for runlocal) the same probe also runs on the raw
pixels and on the backbone at random init: results.json 'baselines'.
Results: DIR/results.json (top1, top5 with more than 5 classes), DIR/tsne.png.

The ImageNet row is DINO's eval_linear.py (CLS of the last 4 blocks, each through the final
norm, for ViT-S; SGD momentum 0.9, lr scaled by batch / 256, no weight decay, cosine, 100
epochs; RandomResizedCrop + flip; centre-crop evaluation) except: the features are standardised
with fixed statistics (linear.normalize_features; DINO feeds them raw) and base_lr 0.02 is for
standardised features (DINO's default is 0.001, which it advises tuning per checkpoint): DINO's
own settings are --config.linear.normalize_features=False --config.optim.base_lr=0.001. The
cosine runs per step to optim.min_lr, crops are bicubic (DINO: bilinear), and the final epoch
is scored (DINO logs the best test accuracy over epochs). For ViT-B DINO reads one block and
the mean patch token: linear.py:last_blocks=1 --config.head.features=cls+mean. The SiT authors'
code (--SiT_LinearEvaluation 1) trains its heads on the frozen backbone with the fine-tuning
recipe instead (AdamW, Mixup/CutMix, RandAugment, hundreds of epochs): another protocol.
"""
from configs import common, transfer_common as tc

# Per dataset: image size, epochs, global batch, optimiser and base lr (per 256), caching.
# ImageNet follows DINO (SGD, 100 epochs, augmented crops; epochs, batch and lr are for that
# path only); the small datasets fit a logistic regression on cached, standardised features
# by L-BFGS to convergence (seconds once the features exist), with the L2 penalty chosen on a
# held-out part of train, so no lr or epochs to tune there.
RECIPES = {
    "imagenet2012": dict(image_size=224, epochs=100, batch=1024, optim="sgd", base_lr=0.02,
                         cache=False),
    "cifar10": dict(image_size=224, epochs=100, batch=256, optim="adamw", base_lr=3e-3,
                    cache=True),
    "cifar100": dict(image_size=224, epochs=100, batch=256, optim="adamw", base_lr=3e-3,
                     cache=True),
    "oxford_flowers102": dict(image_size=224, epochs=200, batch=256, optim="adamw",
                              base_lr=3e-3, cache=True),
    "oxford_iiit_pet": dict(image_size=224, epochs=200, batch=256, optim="adamw",
                            base_lr=3e-3, cache=True),
    "stl10": dict(image_size=224, epochs=100, batch=256, optim="adamw", base_lr=3e-3,
                  cache=True),
    "digits": dict(image_size=16, epochs=60, batch=128, optim="adamw", base_lr=0.3,
                   cache=True),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="imagenet2012", last_blocks=4)
  dataset = "digits" if arg.runlocal else arg.dataset
  r = tc.dataset_row(RECIPES, dataset)
  c = tc.transfer_config("linear", dataset)
  c.data.image_size = r["image_size"]
  c.data.global_batch_size = r["batch"]
  c.data.crop_scale = (0.08, 1.0)
  c.total_epochs = r["epochs"]
  c.head.features = "cls"
  c.head.last_blocks = arg.last_blocks
  c.optim = tc.optim_config(r["optim"], base_lr=r["base_lr"], weight_decay=0.0,
                            warmup_epochs=0)
  c.linear = tc.linear_probe_config(cache_features=r["cache"])
  # Raw-pixel and random-init rows through the same probe: cheap only on small datasets.
  c.baselines = False
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.data.global_batch_size = r["batch"]
    c.baselines = True  # the quickstart's question: does pretraining beat pixels and random init?
  return c
