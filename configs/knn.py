"""DINO's weighted k-NN classifier on frozen features (k in 10, 20, 100, 200; T = 0.07).

  python -m sit_jax.main --config=configs/knn.py:dataset=imagenet2012 \
      --config.init=WORKDIR_OF_PRETRAINING --workdir=DIR
  python -m sit_jax.main --config=configs/knn.py:runlocal --workdir=/tmp/knn

The train, validation and test splits go through the frozen backbone once (evaluation view)
and are cached in DIR/feature_cache (config.feature_cache: a shared path, or 'off'), so a later
run on the same checkpoint and splits reuses them; the train features form a bank split over
the devices. Every k of knn.k comes from one neighbour search; k is chosen on the validation
split and the test split is scored at it (results.json 'by_k' has every k on both). With
baselines=True (on for runlocal) the same k-NN also runs on the raw pixels (the flattened
normalised eval images) and on the backbone at random init (results.json 'baselines').
Results: DIR/results.json (top1, top5 with more than 5 classes), DIR/tsne.png.

As DINO's eval_knn.py: the CLS token after the final norm, l2-normalised; the evaluation view
of every split (the train bank unaugmented): the central 87.5% square, bicubic, i.e. Resize(256)
+ CenterCrop(224); weights exp(similarity / T). Where it departs: k is chosen on validation
(DINO reports k = 20: results.json by_k['20']); on ImageNet the bank is train[:99%] (1% held out
to choose k); the student is read unless --config.init_weights=teacher (DINO reads the
teacher); features are computed in model.dtype, bfloat16 (DINO: float32,
--config.model.dtype=float32).
"""
from configs import common, transfer_common as tc


RECIPES = tc.FEATURE_RECIPES  # the datasets with defaults (image size, batch)


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="imagenet2012", temperature=0.07)
  dataset = "digits" if arg.runlocal else arg.dataset
  c = tc.frozen_features_config("knn", dataset)
  c.knn = dict(k=(10, 20, 100, 200), temperature=arg.temperature, chunk_size=1024)
  # The same k-NN on raw pixels and on the backbone at random init (results.json 'baselines').
  c.baselines = False
  if arg.runlocal:
    tc.shrink_for_runlocal(c)
    c.eval_batch_size = RECIPES["digits"]["batch"]
    c.knn.chunk_size = 128
    c.baselines = True  # the quickstart's question: does pretraining beat pixels and random init?
  return c
