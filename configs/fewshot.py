"""Few-shot linear evaluation of a frozen pretrained ViT (big_vision's few-shot evaluator).

  python -m sit_jax.main --config=configs/fewshot.py:dataset=cifar100 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/fewshot.py:runlocal --config.init=/tmp/sit_local \
      --workdir=/tmp/fewshot

For each of fewshot.shots examples per class and each of fewshot.seeds draws, a closed-form
ridge regression on the l2-normalised frozen features (one-hot targets in {-1, 1}, unpenalised
bias) is fitted to the drawn train examples; its l2 (among fewshot.l2) is chosen on the
validation split, then the test split is scored: mean and standard deviation over the seeds.
Train, validation and test features are extracted once and cached in DIR/feature_cache (or
config.feature_cache) for later runs on the same checkpoint.
Results: DIR/results.json ('fewshot': per shot count test mean/std, chosen l2, validation).
"""
from configs import common, transfer_common as tc

# Image size and the batch of the feature extraction per dataset.
RECIPES = {
    # 25 shots need ~25 images per class, not 1.27M features: the first 10% of train is the pool.
    "imagenet2012": dict(image_size=224, batch=1024, pool="train[:10%]"),
    "cifar10": dict(image_size=224, batch=512),
    "cifar100": dict(image_size=224, batch=512),
    "oxford_flowers102": dict(image_size=224, batch=256),
    "oxford_iiit_pet": dict(image_size=224, batch=256),
    "stl10": dict(image_size=224, batch=512),
    "digits": dict(image_size=16, batch=128),  # the size runlocal pretrains at.
}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="imagenet2012")
  dataset = "digits" if arg.runlocal else arg.dataset
  r = tc.dataset_row(RECIPES, dataset)
  c = tc.transfer_config("fewshot", dataset)
  c.data.image_size = r["image_size"]
  c.eval_batch_size = r["batch"]
  c.data.train_split = r.get("pool", c.data.train_split)  # where the shots are drawn from
  c.head.features = "cls"
  c.head.last_blocks = 1
  c.fewshot = dict(
      shots=(1, 5, 10, 25),
      seeds=5,                                  # draws of the shots per shot count.
      l2=tuple(2.0 ** e for e in range(-16, 11, 2)),  # chosen per shot count on validation.
  )
  c.feature_cache = ""  # '': DIR/feature_cache; a path shares it between workdirs; 'off'.
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.eval_batch_size = r["batch"]
  return c
