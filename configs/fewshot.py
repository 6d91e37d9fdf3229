"""Few-shot linear evaluation of a frozen pretrained ViT (big_vision's few-shot evaluator).

  python -m sit_jax.main --config=configs/fewshot.py:dataset=cifar100 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/fewshot.py:runlocal --config.init=/tmp/sit_local \
      --workdir=/tmp/fewshot

For each of fewshot.shots examples per class and each of fewshot.seeds draws, a closed-form
ridge regression on the l2-normalised frozen features (one-hot targets in {-1, 1}, unpenalised
bias) is fitted to the drawn train examples; its l2 (among fewshot.l2) is chosen on the
validation split, then the test split is scored: mean and standard deviation over the seeds.
A train split with fewer images of a class than the largest shot count is refused.
Train, validation and test features are extracted once and cached in DIR/feature_cache (or
config.feature_cache) for later runs on the same checkpoint.
Results: DIR/results.json ('fewshot': per shot count test mean/std, chosen l2, validation).

Where it departs from big_vision's fewshot_lsr.py: the features are l2-normalised (big_vision
standardises each dimension with the drawn shots' mean and std and adds a bias feature of 100);
l2 is chosen on validation (big_vision fixes it, 2^10 in its configs); each shot count draws
its own examples (big_vision takes the first n of one permutation per class and seed); 5 draws
(big_vision's default 3). Its figures are therefore not big_vision's.
"""
from configs import common, transfer_common as tc

RECIPES = tc.FEATURE_RECIPES  # the datasets with defaults (image size, batch)

# 25 shots need ~25 images per class, not 1.27M features: ImageNet's shots come from the first
# 10% of train; elsewhere from the whole train split.
SHOT_POOLS = {"imagenet2012": "train[:10%]"}
# Shot counts up to the fewest train images of a class (more are refused): flowers' train split
# holds 10 of each.
SHOTS = {"oxford_flowers102": (1, 5, 10)}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="imagenet2012")
  dataset = "digits" if arg.runlocal else arg.dataset
  c = tc.frozen_features_config("fewshot", dataset)
  c.data.train_split = SHOT_POOLS.get(dataset, c.data.train_split)  # the shots are drawn here.
  c.fewshot = dict(
      shots=SHOTS.get(dataset, (1, 5, 10, 25)),
      seeds=5,                                  # draws of the shots per shot count.
      l2=tuple(2.0 ** e for e in range(-16, 11, 2)),  # chosen per shot count on validation.
  )
  # The same few-shot protocol on raw pixels and on the backbone at random init.
  c.baselines = False
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.baselines = True  # the quickstart's question: does pretraining beat pixels and random init?
    c.eval_batch_size = RECIPES["digits"]["batch"]
  return c
