"""Linear probe of the frozen backbone (softmax, or sigmoid for multi-label).

The backbone parameters are never an argument that is differentiated, updated or donated: the
train state holds the head only, and the features pass through jax.lax.stop_gradient. Two modes:
  - cached (config.linear.cache_features): train and test features are extracted once with the
    jitted backbone (eval view: no augmentation) and the head is fitted on them. The default
    solver ('lbfgs') minimises the full-batch cross-entropy + (l2 / 2) ||W||^2 to convergence
    with L-BFGS (optax.lbfgs, zoom line search) on the features sharded over the mesh, so it
    scales with the devices (a few thousand examples per device or fewer: on one device); l2 is
    chosen from config.linear.l2 on a held-out part of the train features
    (config.linear.val_fraction), then the head is refitted on all of them. This is the
    logistic regression of sklearn (l2 = 1 / (C n)): the test checks they agree. Solver 'sgd'
    trains the head with config.optim on shuffled mini-batches instead.
  - augmented: every step crops/flips images on the host and runs the frozen backbone (SGD
    with config.optim), DINO's ImageNet protocol.
With config.linear.normalize_features the features are standardised with the mean and standard
deviation of the training features (MAE's BatchNorm without affine before the head, with its
statistics fixed): the head stays linear in the raw features and the problem is well
conditioned for the optimiser.
"""
from __future__ import annotations

import functools
import itertools
import time
import types

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sit_jax import optim, sharding
from sit_jax.transfer import common, supervised


def make_head(num_classes: int) -> nn.Module:
  return nn.Dense(num_classes, kernel_init=nn.initializers.zeros, name="head")


def init_head_state(head, tx, dim: int, rng) -> supervised.TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = head.init(init_rng, jnp.zeros((1, dim)))["params"]
  return supervised.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=state_rng)


def make_head_step(head, tx, num_classes: int, *, multilabel: bool = False, lr=None):
  """step(state, features, labels) -> (state, metrics): one optimiser step of the head."""

  def step(state, features, labels):
    targets = supervised.soft_targets(labels, num_classes, multilabel=multilabel)

    def loss(params):
      logits = head.apply({"params": params}, features)
      return supervised.loss_fn(logits, targets, multilabel)

    value, grads = jax.value_and_grad(loss)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value}
    if lr is not None:
      metrics["lr"] = lr(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_probe_step(feature_fn, head, tx, num_classes: int, *, multilabel: bool = False, lr=None):
  """step(state, backbone_params, batch) -> (state, metrics) on uint8 images; the backbone is
  frozen (no gradient reaches it; only the head is in the optimiser)."""
  head_step = make_head_step(head, tx, num_classes, multilabel=multilabel, lr=lr)

  def step(state, backbone_params, batch):
    frozen = jax.lax.stop_gradient(backbone_params)
    features = jax.lax.stop_gradient(feature_fn(frozen, common.to_input(batch["image"])))
    return head_step(state, features, batch["label"])

  return step


def fit_head(config, head, tx, features, labels, num_classes: int, mesh, total_steps: int, *,
             multilabel: bool = False, lr=None, writer=None) -> supervised.TrainState:
  """Trains the head on cached features (host numpy, every host holding all of them): shuffled
  epochs of config.data.global_batch_size, the last partial batch dropped. The loop is
  trainer.train's, in memory (a head of a few seconds is not checkpointed)."""
  from sit_jax import trainer
  batch_size = config.data.global_batch_size
  n = len(features)
  check_batch_fits(config, n)
  init = lambda: jax.jit(functools.partial(init_head_state, head, tx, features.shape[1]),
                         out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
  head_step = jax.jit(make_head_step(head, tx, num_classes, multilabel=multilabel, lr=lr),
                      in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh),
                                    sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh), donate_argnums=(0,))
  per_epoch = n // batch_size
  p, count = jax.process_index(), jax.process_count()

  def batches(start_step):
    del start_step  # always 0: nothing is restored.
    rng = np.random.default_rng(config.seed)
    for step in itertools.count():
      if step % per_epoch == 0:
        order = rng.permutation(n)
      idx = order[(step % per_epoch) * batch_size:][:batch_size].reshape(count, -1)[p]
      yield {"x": features[idx], "y": labels[idx]}

  # The parts of an experiment.Experiment the loop reads.
  run = types.SimpleNamespace(config=config, mesh=mesh, workdir=None, is_main=p == 0,
                              metric_writer=writer)
  outcome = trainer.train(run, init=init, abstract=None, metadata=None, batches=batches,
                          step_fn=lambda state, b: head_step(state, b["x"], b["y"]),
                          total_steps=total_steps, checkpoints=False)
  from sit_jax import experiment
  if outcome.error:
    raise experiment.RunError(outcome.error)
  if outcome.stopped:  # a signal: nothing of a head trained in memory can be kept.
    raise experiment.RunError(
        f"Stopped by a signal at step {outcome.step} of the head's {total_steps}: a head "
        "trained in memory is not saved; start the same command again to train it.")
  return outcome.state


def check_batch_fits(config, num_examples: int):
  """The SGD head's epochs are whole batches of the training features: refuses a batch larger
  than all of them."""
  batch_size = config.data.global_batch_size
  if num_examples < batch_size:
    raise ValueError(f"data.global_batch_size={batch_size} is more than the {num_examples} "
                     "training examples, and linear.solver='sgd' trains on whole batches: set "
                     f"--config.data.global_batch_size={num_examples} or less, or "
                     "--config.linear.solver=lbfgs.")


def feature_standardizer(features, eps: float = 1e-6):
  """f -> (f - mean) / std with the statistics of `features` (numpy or traced arrays); a
  feature (almost) constant over `features`, such as a border pixel, is only centred."""
  mean = np.mean(features, axis=0).astype(np.float32)
  std = np.std(features, axis=0).astype(np.float32)
  std = np.where(std > eps, std, 1.0).astype(np.float32)
  return lambda f: (f - mean) / std


def training_feature_standardizer(config, features_of, params, mesh, image_size: int,
                                  num_examples: int):
  """The augmented probe's feature_standardizer: the statistics of the features the head trains
  on, those of the first training batches (linear.stats_examples views, at most about one per
  example of the split's `num_examples`), a shuffled sample of the split. (The evaluation pass
  is in the split's order, class by class in a folder: the first 10,000 images of an ImageNet
  folder are 8 classes.)"""
  examples = min(config.linear.stats_examples, num_examples)
  num = -(-examples // config.data.global_batch_size)
  place = common.train_placer(config, mesh, image_size)
  extract = jax.jit(features_of, out_shardings=sharding.replicated(mesh))
  batches = itertools.islice(common.train_batches(config, 0, image_size), num)
  logging.info("Feature statistics of %d training batches", num)
  return feature_standardizer(np.concatenate(
      [jax.device_get(extract(params, place(batch)["image"])) for batch in batches]))


def head_logits(head_params, features):
  """The linear head on host features (numpy)."""
  params = jax.device_get(head_params)
  return np.asarray(features) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])


# ---------------------------------------------------------------------------------------------
# Full-batch L-BFGS logistic regression on cached features.
# ---------------------------------------------------------------------------------------------


def logistic_objective(params, x, y, weight, l2, *, multilabel: bool = False):
  """Weighted mean over examples of the softmax cross-entropy (integer labels) or of the sum over
  classes of the sigmoid cross-entropy (multi-hot labels), + (l2 / 2) ||kernel||^2 (the bias is
  not penalised). With l2 = 1 / (C n) this is sklearn's LogisticRegression(C) objective / (C n):
  the same minimiser."""
  logits = x @ params["kernel"] + params["bias"]
  if multilabel:
    per_example = optax.sigmoid_binary_cross_entropy(logits, y.astype(logits.dtype)).sum(-1)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  data = jnp.sum(per_example * weight) / jnp.sum(weight)
  return data + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))


@functools.lru_cache(maxsize=8)
def _lbfgs_solver(mesh, multilabel: bool, memory_size: int):
  """jitted solve(params, x, y, weight, l2, max_iter, tol) -> (params, loss, grad_norm, iters):
  L-BFGS until the gradient's l2 norm is below tol or max_iter iterations. Cached: a grid of l2
  values (and the baselines of the same shape) compile once."""
  opt = optax.lbfgs(memory_size=memory_size)

  def solve(params, x, y, weight, l2, max_iter, tol):
    fun = lambda p: logistic_objective(p, x, y, weight, l2, multilabel=multilabel)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
      return optax.apply_updates(params, updates), state

    def keep_going(carry):
      _, state = carry
      count = optax.tree_utils.tree_get(state, "count")
      grad = optax.tree_utils.tree_get(state, "grad")
      return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad) >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
    loss, grad = jax.value_and_grad(fun)(params)
    return params, loss, optax.tree_utils.tree_norm(grad), optax.tree_utils.tree_get(state,
                                                                                      "count")

  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(solve, in_shardings=(replicated, batch, batch, batch, None, None, None),
                 out_shardings=replicated)


# Fewer examples per device than this and the full-batch L-BFGS is overhead more than compute:
# on 8 simulated CPU devices the tests' probes took 5x the CPU time of one device.
MIN_EXAMPLES_PER_DEVICE = 4096


def _solver_mesh(mesh, num_examples: int):
  """`mesh`, or for few examples the first local device: every process holds all the features,
  so each solves the same problem there, without collectives."""
  if num_examples >= MIN_EXAMPLES_PER_DEVICE * mesh.devices.size:
    return mesh
  return sharding.make_mesh(devices=jax.local_devices()[:1])


def _place_examples(features, labels, mesh, rows: int = 0):
  """(x, y, weight) on the mesh, split over its batch axes; zero-weight padding rows make the
  count at least `rows` and divisible by the data-parallel size. Every host holds all the
  (host numpy) features."""
  n = len(features)
  size = sharding.data_parallel_size(mesh) * jax.process_count()
  pad = max(rows, n) - n
  pad += -(n + pad) % size
  x = np.concatenate([np.asarray(features, np.float32),
                      np.zeros((pad, features.shape[1]), np.float32)])
  labels = np.asarray(labels)
  y = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)]).astype(np.int32)
  weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  spec = sharding.batch_sharding(mesh)
  place = lambda a: jax.make_array_from_callback(a.shape, spec, lambda index: a[index])
  return place(x), place(y), place(weight)


def fit_logistic(features, labels, num_classes: int, l2: float, mesh=None, *,
                 multilabel: bool = False, max_iter: int = 5000, tol: float = 1e-5,
                 memory_size: int = 20, init=None, rows: int = 0):
  """Logistic regression of host features (N, D) on labels (N,) (or multi-hot (N, C)) to
  convergence: returns (head params {'kernel', 'bias'} as host numpy, info dict with the final
  objective, its gradient norm and the number of iterations). `init`: warm start; `rows`: pad
  (with zero weight) to at least this many examples, so that fits of subsets share one
  compiled solver (and its device or mesh)."""
  mesh = _solver_mesh(mesh if mesh is not None else sharding.make_mesh(),
                      max(rows, len(features)))
  x, y, weight = _place_examples(features, labels, mesh, rows)
  dim = features.shape[1]
  if init is None:
    init = {"kernel": np.zeros((dim, num_classes), np.float32),
            "bias": np.zeros((num_classes,), np.float32)}
  init = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float32), init),
                        sharding.replicated(mesh))
  solve = _lbfgs_solver(mesh, multilabel, memory_size)
  params, loss, grad_norm, iterations = solve(init, x, y, weight, jnp.float32(l2),
                                              jnp.int32(max_iter), jnp.float32(tol))
  params, loss, grad_norm, iterations = jax.device_get((params, loss, grad_norm, iterations))
  return params, {"loss": float(loss), "grad_norm": float(grad_norm),
                  "iterations": int(iterations), "l2": float(l2)}


def _primary(scores: dict) -> float:
  return scores["mAP"] if "mAP" in scores else scores["top1"]


def probe_cached(train_feats, train_labels, test_feats, test_labels, num_classes: int, *,
                 l2=(1e-4,), val_fraction: float = 0.2, normalize: bool = True,
                 multilabel: bool = False, voc07: bool = False, max_iter: int = 5000,
                 tol: float = 1e-5, seed: int = 0, mesh=None):
  """The cached linear probe as one function of the features (used for the backbone and for the
  baselines alike): standardise with the train statistics, choose l2 among the candidates on
  a held-out `val_fraction` of the train features (a fixed shuffle; ties go to the larger l2),
  refit on all train features, score the test features.

  Returns (scores, head params, standardize fn, info); info has the chosen l2, the held-out
  score of every candidate and the final fit's objective / gradient norm / iterations.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  train_feats = np.asarray(train_feats, np.float32)
  standardize = feature_standardizer(train_feats) if normalize else (lambda f: f)
  fit = functools.partial(fit_logistic, num_classes=num_classes, mesh=mesh,
                          multilabel=multilabel, max_iter=max_iter, tol=tol,
                          rows=len(train_feats))
  candidates = sorted((float(v) for v in np.atleast_1d(l2)), reverse=True)
  info = {}
  if len(candidates) > 1:
    n = len(train_feats)
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
      raise ValueError(f"linear.val_fraction={val_fraction} leaves no train or held-out "
                       f"examples out of {n}.")
    order = np.random.default_rng(seed).permutation(n)
    fit_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
    part_standardize = (feature_standardizer(train_feats[fit_idx]) if normalize
                        else (lambda f: f))
    fx, vx = part_standardize(train_feats[fit_idx]), part_standardize(train_feats[val_idx])
    held_out, fitted, params = {}, {}, None
    for value in candidates:  # strongest penalty first: each fit warm-starts the next
      params, _ = fit(fx, train_labels[fit_idx], l2=value, init=params)
      fitted[value] = params
      held_out[value] = _primary(common.score(head_logits(params, vx), train_labels[val_idx],
                                              multilabel, voc07))
    best = max(candidates, key=lambda v: (held_out[v], v))
    info["held_out"] = {f"{v:g}": s for v, s in held_out.items()}
    info["held_out_examples"] = n_val
    init = fitted[best]
  else:
    best, init = candidates[0], None
  params, fit_info = fit(standardize(train_feats), train_labels, l2=best, init=init)
  if fit_info["iterations"] >= max_iter and fit_info["grad_norm"] >= tol:
    logging.warning("L-BFGS stopped at linear.max_iter=%d with the gradient's norm %.2g above "
                    "linear.tol=%g (l2 %g): the head is not the converged logistic regression; "
                    "raise --config.linear.max_iter or --config.linear.tol.", max_iter,
                    fit_info["grad_norm"], tol, best)
  info.update(fit_info)
  scores = common.score(head_logits(params, standardize(test_feats)), test_labels, multilabel,
                        voc07)
  return scores, params, standardize, info


def run(config, workdir: str, *, multilabel: bool = False) -> dict:
  from sit_jax import experiment, trainer

  start = time.perf_counter()
  with experiment.Experiment(config, workdir) as exp:
    # Input and frozen backbone. ---------------------------------------------------------------
    mesh = exp.mesh
    train_info, test_info = common.dataset_infos(config)
    common.check_multilabel(train_info, multilabel)
    num_classes = train_info.num_classes
    size = config.data.image_size
    lin, voc07 = config.linear, config.get("voc07", False)
    solver = lin.get("solver", "lbfgs") if lin.cache_features else "augmented"
    if solver not in ("lbfgs", "sgd", "augmented"):
      raise ValueError(f"linear.solver must be 'lbfgs' or 'sgd', not {solver!r}.")
    if solver == "sgd":
      check_batch_fits(config, train_info.num_examples)
    if solver == "augmented":
      supervised.warn_if_batch_exceeds_split(config, train_info)
    backbone = common.load_backbone(config, image_size=size, drop_path_rate=0.0)
    params = common.place_backbone(backbone, mesh, config.sharding_rules, config.seed)
    fn = common.make_feature_fn(backbone.module, config.head.features, config.head.last_blocks)
    features_of = common.uint8_features(fn)
    dim = common.feature_dim(backbone.module, config.head.features, config.head.last_blocks)

    total_steps, steps_per_epoch = optim.schedule_lengths(config, train_info.num_examples)
    lr = supervised.lr_schedule(config, total_steps, steps_per_epoch)
    tx = supervised.make_optimizer(config, lr)
    head = make_head(num_classes)
    # Progress lines count steps only for the SGD solvers: L-BFGS logs one line when it is done.
    writer = exp.writer(0 if solver == "lbfgs" else total_steps, config.data.global_batch_size)
    logging.info("%s: %d classes, %d train examples, %d-d features, solver %s%s; backbone %s",
                 train_info.name, num_classes, train_info.num_examples, dim, solver,
                 "" if solver == "lbfgs" else f", {total_steps} steps", backbone.name)

    def lbfgs_probe(train_feats, train_labels, test_feats, test_labels):
      return probe_cached(
          train_feats, train_labels, test_feats, test_labels, num_classes,
          l2=tuple(lin.get("l2", (1e-4,))), val_fraction=lin.get("val_fraction", 0.2),
          normalize=lin.normalize_features, multilabel=multilabel, voc07=voc07,
          max_iter=lin.get("max_iter", 5000), tol=lin.get("tol", 1e-5), seed=config.seed,
          mesh=mesh)

    def sgd_probe(train_feats, train_labels, test_feats, test_labels, log=None):
      standardize = (feature_standardizer(train_feats) if lin.normalize_features
                     else (lambda f: f))
      state = fit_head(config, head, tx, standardize(train_feats), train_labels, num_classes,
                       mesh, total_steps, multilabel=multilabel, lr=lr, writer=log)
      scores = common.score(head_logits(state.params, standardize(test_feats)), test_labels,
                            multilabel, voc07)
      return scores, state.params, standardize, {"steps": total_steps}

    def test_features():
      return common.extract_features(
          features_of, params, common.eval_batches(config, config.data.test_split, size), mesh,
          common.log_progress("test features"))

    # Train the head. -------------------------------------------------------------------------
    train_metrics = {}
    if solver in ("lbfgs", "sgd"):
      train_feats, train_labels, test_feats, test_labels = common.split_features(
          config, features_of, params, mesh, size)
      extra = common.classes_missing_from_train(config, train_info, train_labels)
      if solver == "lbfgs":
        scores, _, standardize, info = lbfgs_probe(train_feats, train_labels, test_feats,
                                                   test_labels)
        steps = info["iterations"]
        train_metrics = {"loss": info["loss"], "grad_norm": info["grad_norm"]}
        extra["probe"] = info
        # One line: the L-BFGS fit, and the held-out score of each l2 candidate.
        writer.write_scalars(steps, {"probe/loss": info["loss"],
                                     "probe/grad_norm": info["grad_norm"], "probe/l2": info["l2"],
                                     "probe/iterations": steps,
                                     **{f"probe/held_out/l2_{k}": v
                                        for k, v in info.get("held_out", {}).items()}})
      else:
        scores, _, standardize, _ = sgd_probe(train_feats, train_labels, test_feats, test_labels,
                                              log=writer)
        steps = total_steps
      test_feats = standardize(test_feats)
      writer.write_scalars(steps, {f"test/{k}": v for k, v in scores.items()})
    else:
      train_batches, missing_classes = supervised.checked_train_batches(config, train_info, size)

      # The statistics and the step that uses them, at the first step or evaluation: once
      # trainer.train has accepted the checkpoint, so that a refused resume extracts nothing.
      @functools.cache
      def standardizer():
        if not lin.normalize_features:
          return lambda f: f
        return training_feature_standardizer(config, features_of, params, mesh, size,
                                             train_info.num_examples)

      @functools.cache
      def probe():
        standardize = standardizer()
        return jax.jit(make_probe_step(lambda p, x: standardize(fn(p, x)), head, tx, num_classes,
                                       multilabel=multilabel, lr=lr),
                       out_shardings=sharding.replicated(mesh), donate_argnums=(0,))

      head_state = jax.jit(functools.partial(init_head_state, head, tx, dim),
                           out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
      cache = {}

      def evaluate(state, split):
        standardize = standardizer()
        if split == config.data.test_split:
          feats, labels = test_features()
          cache["test"] = standardize(feats), labels
        else:
          feats, labels = common.extract_features(
              features_of, params, common.eval_batches(config, split, size), mesh)
        return common.score(head_logits(state.params, standardize(feats)), labels, multilabel,
                            voc07)

      outcome = trainer.train(
          exp, init=lambda: head_state, abstract=supervised.abstract_of(head_state),
          step_fn=lambda s, b: probe()(s, params, b),
          batches=train_batches,
          place=common.train_placer(config, mesh, size), total_steps=total_steps,
          metadata=supervised.frozen_checkpoint_metadata(config, backbone, num_classes),
          hooks=[supervised.evaluation_hook(config, evaluate, total_steps)])
      train_metrics, scores, steps = (outcome.metrics, supervised.test_scores(outcome.evaluated),
                                      outcome.step)
      extra = {**missing_classes(),
               **{k: v for k, v in outcome.results().items()
                  if k in ("checkpoint", "preempted", "steps_this_run", "error")}}
      test_feats, test_labels = cache.get("test", (np.zeros((0, dim)), np.zeros((0,))))

    # Baselines: the same probe on raw pixels and on the random-init backbone. -----------------
    if config.get("baselines", False) and scores:
      # The augmented SGD probe would need a training run per row: its baselines use the cached
      # L-BFGS probe (marked in results.json).
      evaluate_cached = sgd_probe if solver == "sgd" else lbfgs_probe
      baselines = {}
      for name, (base_fn, base_params) in common.baseline_extractors(config, backbone, mesh,
                                                                     fn).items():
        feats = common.split_features(config, base_fn, base_params, mesh, size, f"{name}: ")
        row, _, _, info = evaluate_cached(*feats)
        baselines[name] = {**row, "dim": int(feats[0].shape[1]),
                           **({"l2": info["l2"]} if "l2" in info else {})}
      if "random_init" not in baselines:  # the evaluated backbone is the random init
        baselines["random_init"] = {**scores, "dim": dim,
                                    **({"l2": extra["probe"]["l2"]} if "probe" in extra else {})}
      if solver == "augmented":
        baselines["protocol"] = "cached features, L-BFGS"
      rows = {k: v for k, v in baselines.items() if isinstance(v, dict)}
      writer.write_scalars(steps, {f"baselines/{name}/{k}": v for name, row in rows.items()
                                   for k, v in row.items() if k not in ("dim", "l2")})
      common.log_baselines("linear probe", common.dataset_name(config), backbone, scores,
                           rows)
      extra["baselines"] = baselines

    results = common.results_dict(
        config, backbone, train_info, test_info, len(test_labels), scores, frozen=True,
        features=common.features_name(config), last_blocks=config.head.last_blocks,
        cached_features=bool(lin.cache_features), solver=solver, steps=steps,
        total_steps=steps if solver == "lbfgs" else total_steps,
        final_train_metrics=train_metrics, **extra,
        seconds_this_run=time.perf_counter() - start)
    results = common.results_table(
        results, f"frozen backbone, linear probe ({solver})",
        {f"test {k}": v for k, v in scores.items()})
    tsne = None
    if not multilabel and not results.get("error"):
      tsne = common.tsne(config, exp.workdir, test_feats, test_labels,
                         f"{results['dataset']} ({backbone.name}): linear top-1 "
                         f"{scores.get('top1', float('nan')):.3f}", class_names=train_info.classes)
    exp.finish(results, also=[tsne] if tsne else [])
  return results
