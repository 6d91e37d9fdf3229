"""Multi-label classification (sigmoid head, mAP), fine-tuned or as a frozen linear probe.

  python -m sit_jax.main --config=configs/multilabel.py:dataset=voc2007 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/multilabel.py:dataset=voc2007,frozen=True ...
  python -m sit_jax.main --config=configs/multilabel.py:dataset=coco2017 ...
  python -m sit_jax.main --config=configs/multilabel.py:runlocal --workdir=/tmp/ml

VOC2007 from TFDS 'voc/2007': the image's object labels as a multi-hot target, trained on
train, with its validation split held out to choose on (fine-tuned: scored every eval_every;
frozen: unused, the probe's l2 is chosen on linear.val_fraction of train, as configs/linear.py),
evaluated on test. runlocal uses embedded:digits_multilabel (the digit, odd, >= 5). mAP: mean
over classes with a positive of sklearn-style AP (voc07=True: the 11-point VOC07 AP).
dataset=coco2017: TFDS 'coco/2017', the classes of an image's annotated objects (objects/label,
80 classes), trained on train[:98%], chosen on train[98%:], scored on validation (COCO's test
split has no annotations); VOC's recipe values, not tuned on COCO. Your own data: a TFDS dataset
whose 'labels' feature is a Sequence(ClassLabel), as voc/2007's, or whose 'objects' sequence has
a 'label' ClassLabel, as coco/2017's (a folder gives one class per image). Fine-tuning keeps
RandAugment but no Mixup/CutMix, label smoothing or erasing (they would erase or blend away the
labels of small objects); set through augment.*, they apply to the multi-hot targets
(smoothing: 1 - s + s / C and s / C, the values timm's BinaryCrossEntropy gives one-hot
targets). Results: DIR/results.json (mAP).

Not the VOC devkit's protocol: published VOC07 figures train on trainval (here train, with
validation held out), and the devkit leaves an image whose objects of a class are all marked
difficult out of that class's AP, where TFDS 'labels' (read here) counts them as positives.
"""
from configs import common, transfer_common as tc

RECIPES = {
    "voc2007": dict(image_size=224, epochs=100, batch=256, base_lr=2.5e-4, linear_lr=1e-3),
    # VOC 2007's values, not tuned on COCO (47 times VOC's 2,501 train images: 47 times the steps).
    "coco2017": dict(image_size=224, epochs=100, batch=256, base_lr=2.5e-4, linear_lr=1e-3),
    "digits_multilabel": dict(image_size=16, epochs=10, batch=64, base_lr=2e-3, linear_lr=0.3),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="voc2007", frozen=False)
  dataset = "digits_multilabel" if arg.runlocal else arg.dataset
  r = tc.dataset_row(RECIPES, dataset)
  c = tc.transfer_config("multilabel", dataset)
  c.data.image_size = r["image_size"]
  c.data.global_batch_size = r["batch"]
  c.total_epochs = r["epochs"]
  c.multilabel = dict(frozen=arg.frozen)
  c.voc07 = False
  if arg.frozen:
    c.optim = tc.optim_config("adamw", base_lr=r["linear_lr"], weight_decay=0.0,
                              warmup_epochs=0)
    c.linear = tc.linear_probe_config(cache_features=True)
    c.head.last_blocks = 1
  else:
    c.model.drop_path_rate = 0.1
    c.optim = tc.optim_config("adamw", base_lr=r["base_lr"], weight_decay=0.05,
                              warmup_epochs=5, layer_decay=0.75)
    c.augment = tc.deit_augment_config(erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
                                       label_smoothing=0.0)
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.data.global_batch_size = r["batch"]
    c.total_epochs = 0
    c.total_steps = 200 if arg.frozen else 50
    if not arg.frozen:
      c.data.global_batch_size = 32
      c.optim.warmup_epochs = 0.2
      c.log_every = 10
  return c
