"""timm ViT <-> sit_jax backbone conversion: same features, exact round trip, clear errors.

PyTorch only ever runs in child processes: with torch loaded into a process that already runs
XLA, an XLA:CPU computation later in the same pytest worker aborted now and then.
"""
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if not all(importlib.util.find_spec(m) for m in ("torch", "timm", "safetensors")):
  pytest.skip("needs torch, timm and safetensors (the test extra installs them)",
              allow_module_level=True)

from safetensors.numpy import load_file, save_file  # noqa: E402

from sit_jax import checkpoint, convert, features  # noqa: E402
from sit_jax.models import vit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_NAME = "vit_small_patch16_224"

# Writes, into argv[1]: a DINO/SiT-style training checkpoint (DDP prefix, backbone + head,
# student/teacher) of a randomly initialised timm ViT-S/16, its plain state dict, and its CLS
# features on fixed images.
MAKE_REFERENCE = textwrap.dedent(f"""
    import os, sys
    import numpy as np, timm, torch
    from safetensors.torch import save_file
    out = sys.argv[1]
    torch.manual_seed(0)
    model = timm.create_model("{TIMM_NAME}", pretrained=False, num_classes=0).eval()
    # timm starts biases and LayerNorms at 0 / 1: randomise them so the test sees every mapping.
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith(".bias") or "norm" in name:
          p.add_(0.02 * torch.randn_like(p))
    state = model.state_dict()
    student = {{f"module.backbone.{{k}}": v for k, v in state.items()}}
    student["module.head.last_layer.weight"] = torch.zeros(8, 384)
    teacher = {{f"backbone.{{k}}": v for k, v in state.items()}}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 384)
    torch.save({{"student": student, "teacher": teacher, "epoch": 3}},
               os.path.join(out, "dino_style.pth"))
    save_file({{k: v.contiguous() for k, v in state.items()}}, os.path.join(out, "timm.safetensors"))
    images = np.random.RandomState(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
      cls = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))[:, 0]
    np.save(os.path.join(out, "images.npy"), images)
    np.save(os.path.join(out, "cls.npy"), cls.numpy())
    # DINO's evaluation input (eval_knn.py, without the resize: the pixels are 224 px already).
    from PIL import Image
    from torchvision import transforms
    pixels = np.random.RandomState(1).randint(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    dino_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
      cls = model.forward_features(torch.stack([dino_input(Image.fromarray(x))
                                                for x in pixels]))[:, 0]
    np.save(os.path.join(out, "pixels.npy"), pixels)
    np.save(os.path.join(out, "pixels_cls.npy"), cls.numpy())
    from timm.layers import resample_abs_pos_embed
    for side in (24, 8):  # the 14 x 14 grid up (384 px) and down (128 px)
      resized = resample_abs_pos_embed(model.pos_embed.detach(), [side, side])
      np.save(os.path.join(out, f"pos_embed_{{side}}.npy"), resized.numpy())
    """)

# Loads argv[1] into a fresh timm ViT-S/16 with strict=True.
TIMM_LOADS = textwrap.dedent(f"""
    import sys
    import timm
    from safetensors.torch import load_file
    model = timm.create_model("{TIMM_NAME}", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(sys.argv[1]), strict=True)
    print("loaded")
    """)


def run_python(*args, timeout=300):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=timeout)
  return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp("timm")
  proc = run_python("-c", MAKE_REFERENCE, str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
  export = tmp_path_factory.mktemp("export") / "dino_s16"
  proc = run_python("-m", "sit_jax.convert", "to-jax", f"--input={reference / 'dino_style.pth'}",
                    f"--output={export}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "S/16 backbone of" in proc.stdout and "dino_style.pth (teacher)" in proc.stdout
  assert "normalised by ImageNet's mean and std" in proc.stdout  # what timm's augreg ViTs are not
  return str(export)


def test_architecture_is_inferred(converted):
  _, config = checkpoint.load_backbone(converted)
  assert config["variant"] == "S/16" and config["image_size"] == 224
  assert json.load(open(os.path.join(converted, "model_config.json")))["variant"] == "S/16"


def test_same_cls_features_as_timm(reference, converted):
  params, config = checkpoint.load_backbone(converted)
  module = vit.backbone_from_config(config)
  images = np.load(reference / "images.npy")
  got = jax.jit(lambda p, x: module.apply({"params": p}, x)["cls"])(params["backbone"],
                                                                       jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got), np.load(reference / "cls.npy"), atol=1e-4, rtol=0)


def test_features_of_uint8_images_are_timms_on_dinos_input(reference, converted):
  """features.load: the ImageNet mean and std of DINO's evaluation input, then timm's CLS."""
  extract = features.load(converted, image_size=224, resize_mode="resize", batch_size=8)
  np.testing.assert_allclose(extract(np.load(reference / "pixels.npy")),
                             np.load(reference / "pixels_cls.npy"), atol=1e-4, rtol=0)


def test_pos_embed_resize_is_timms(reference, converted):
  """A backbone run at another resolution resizes its position embedding as timm does
  (resample_abs_pos_embed: bicubic, antialiased when shrinking)."""
  params, _ = checkpoint.load_backbone(converted)
  for side in (24, 8):
    np.testing.assert_allclose(
        np.asarray(vit.resize_pos_embed(jnp.asarray(params["backbone"]["pos_embed"]), (side, side))),
        np.load(reference / f"pos_embed_{side}.npy"), atol=1e-5, rtol=0)


def test_round_trip_is_exact_and_timm_loads_it(reference, converted, tmp_path):
  params, config = checkpoint.load_backbone(converted)
  out = str(tmp_path / "back.safetensors")
  convert.to_timm(converted, out)
  state, original = load_file(out), load_file(str(reference / "timm.safetensors"))
  assert sorted(state) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)
  proc = run_python("-c", TIMM_LOADS, out)
  assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
  # The command never replaces a file it did not just write, as to-jax an export.
  with open(out, "rb") as f:
    written = f.read()
  absl_level = logging.getLogger("absl").level
  assert convert.main(["to-timm", f"--input={converted}", f"--output={out}"]) == 1
  assert convert.main(["to-timm", f"--input={converted}", f"--output={out}", "--overwrite"]) == 0
  assert logging.getLogger("absl").level == absl_level  # called from Python: logging as it was.
  with open(out, "rb") as f:
    assert f.read() == written
  again, again_config = convert.torch_to_params(state)
  assert again_config["variant"] == config["variant"]
  jax.tree.map(np.testing.assert_array_equal, again, params["backbone"])
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype, again, params["backbone"]))
  assert all(leaves)


def test_to_timm_writes_a_checkpoint_s_student_or_teacher(exported_backbone, tmp_path):
  _, student = exported_backbone
  teacher = jax.tree.map(lambda x: 2 * x, student)
  with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", every=1) as ck:
    ck.save(1, {"params": {"backbone": student}, "teacher": {"backbone": teacher}},
            metadata={"model": {"variant": "Mu/4", "image_size": 32}, "experiment": "sit"})
  for use, want in (("student", student), ("teacher", teacher)):
    out = str(tmp_path / f"{use}.safetensors")
    flags = [f"--use={use}"] if use == "teacher" else []  # the student by default
    assert convert.main(["to-timm", f"--input={tmp_path / 'run'}", f"--output={out}", *flags]) == 0
    got, _ = convert.torch_to_params(load_file(out))
    jax.tree.map(np.testing.assert_array_equal, got, want)


# argv: uint8 images (.npy, NHWC), where to save the results (.npz) and a JSON list of PyTorch
# snippets that to-timm printed. Each runs on the images normalised by ImageNet's mean and std;
# the .npz gets, for snippet i, out_i (its `logits`, else its `features`) and tokens_i
# (forward_features of its input).
TIMM_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np, timm, torch
    images, out, snippets = sys.argv[1:]
    pixels = torch.from_numpy(np.load(images)).permute(0, 3, 1, 2).float() / 255
    results = {}
    for i, code in enumerate(json.loads(snippets)):
      x = (pixels - torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
          timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
      scope = {"x": x}
      with torch.no_grad():
        exec(code, scope)
        results[f"out_{i}"] = scope.get("logits", scope.get("features")).numpy()
        results[f"tokens_{i}"] = scope["model"].forward_features(scope["x"]).numpy()
    np.savez(out, **results)
    """)


def printed_code(capsys) -> str:
  """The PyTorch lines to-timm printed (indented by two spaces)."""
  return "\n".join(l[2:] for l in capsys.readouterr().out.splitlines() if l.startswith("  "))


def test_timm_computes_what_sit_jax_does_through_the_printed_lines(exported_backbone, tmp_path,
                                                                   capsys, caplog):
  """The same uint8 images give, through the lines to-timm prints, what sit_jax's transfer runs
  compute (ImageNet normalisation, then the backbone's own standardisation): a backbone's tokens,
  and the logits of a fine-tuning workdir's classifier on each head.features; to-jax of the
  classifier's file gives back the fine-tuned backbone."""
  from configs import finetune as finetune_config
  from sit_jax import metrics
  from sit_jax.transfer import common, finetune
  _, params = exported_backbone
  config = {"variant": "Mu/4", "image_size": 32, "standardize_input": True}
  module = vit.backbone_from_config(config)
  export = checkpoint.export_backbone(tmp_path / "export", {"backbone": params}, config)
  backbone_file = str(tmp_path / "backbone.safetensors")
  assert convert.main(["to-timm", f"--input={export}", f"--output={backbone_file}"]) == 0
  told = printed_code(capsys)
  plain = "\n".join(l for l in told.splitlines() if "standardize_input" not in l)
  assert plain != told
  snippets, want = [told, plain], []
  images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  images[3] = 100
  images[3, :16] = 101  # one grey level apart: a std below the floor standardize_per_image sets
  out_jax = module.apply({"params": params}, common.to_input(jnp.asarray(images)))
  tokens = np.concatenate([np.asarray(out_jax["cls"])[:, None], np.asarray(out_jax["patches"])], 1)
  # Fine-tuning workdirs as finetune.run leaves them: the Classifier's params (its head, zero at
  # init, drawn at random here) in a checkpoint, and the run's config.json.
  classifiers = {}
  for i, features in enumerate(("cls", "mean", "cls+mean")):
    model = finetune.Classifier(module, 5, features)
    tree = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(i), images[:1])["params"])
    tree["head"]["fc"] = jax.tree.map(
        lambda x: 0.2 * np.random.RandomState(i).normal(size=x.shape).astype(np.float32),
        tree["head"]["fc"])
    run = tmp_path / features
    with checkpoint.Checkpointer(run / "checkpoints", every=1) as ck:
      ck.save(3, {"step": np.int32(3), "params": tree},
              metadata={"model": config, "experiment": "finetune", "num_classes": 5})
    run_config = finetune_config.get_config("runlocal")
    run_config.head.features = features
    metrics.write_json(run / "config.json", run_config.to_dict())
    out = str(tmp_path / f"{features}.safetensors")
    assert convert.main(["to-timm", f"--input={run}", f"--output={out}"]) == 0
    snippets.append(printed_code(capsys))
    want.append(np.asarray(model.apply({"params": tree}, common.to_input(jnp.asarray(images)))))
    classifiers[features] = out, tree
  assert "global_pool='avg', fc_norm=False" in snippets[3]
  np.save(tmp_path / "images.npy", images)
  proc = run_python("-c", TIMM_RUN, str(tmp_path / "images.npy"), str(tmp_path / "got.npz"),
                    json.dumps(snippets))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "got.npz")
  np.testing.assert_allclose(got["tokens_0"], tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["out_0"], tokens[:, 0], atol=1e-4, rtol=0)
  # The standardising line matters: without it every image's tokens are others.
  assert all(np.abs(got["tokens_1"] - tokens)[i].max() > 0.1 for i in range(4))
  for i, logits in enumerate(want):
    assert np.abs(logits).max() > 0.1  # a head that is not zero
    np.testing.assert_allclose(got[f"out_{i + 2}"], logits, atol=1e-4, rtol=0)
  # The files keep the setting for to-jax, which drops the classifier: the way back is the
  # backbone that was exported, or fine-tuned.
  for name, (path, backbone) in {"backbone": (backbone_file, params),
                                 "classifier": (classifiers["mean"][0],
                                                classifiers["mean"][1]["backbone"])}.items():
    back = tmp_path / f"back_from_{name}"
    convert.to_jax(path, str(back))
    got_back, back_config = checkpoint.load_backbone(back)
    assert back_config["standardize_input"] is True and back_config["variant"] == "Mu/4"
    assert "converted_from" not in back_config  # the model's settings only
    assert checkpoint.export_origin(back) == {"converted_from": os.path.abspath(path)}
    jax.tree.map(np.testing.assert_array_equal, got_back["backbone"], backbone)
  assert "Dropped 2 parameters that are not the backbone (heads): head.bias, head.weight" in \
      caplog.text
  # A step directory copied out of its workdir: whether its classifier pools CLS or the mean
  # patch token (the same shapes) is in the run's config.json only, for a step saved before its
  # metadata recorded head.features (as these are).
  shutil.copytree(tmp_path / "mean" / "checkpoints" / "3", tmp_path / "copied" / "3")
  with pytest.raises(convert.ConversionError, match=r"Cannot tell whether the classifier of .*"
                     r"copied/3 is on the CLS token or on the mean patch token: its metadata does "
                     r"not say .* and the config.json of its run in .*copied is missing."):
    convert.to_timm(str(tmp_path / "copied" / "3"), str(tmp_path / "copied.safetensors"))


def test_a_step_converts_with_the_pooling_its_metadata_records(exported_backbone, tmp_path):
  """A fine-tuning step's metadata records head.features (trainer.RESUME_SETTINGS): the step
  converts out of its workdir with that pooling, and inside a workdir whose config.json says
  another, it is refused rather than pooled as that run's."""
  _, backbone = exported_backbone
  width = vit.parse_variant("Mu/4")["width"]
  fc = {"kernel": np.arange(width * 5, dtype=np.float32).reshape(width, 5),
        "bias": np.arange(5, dtype=np.float32)}
  with checkpoint.Checkpointer(tmp_path / "ft" / "checkpoints", every=1) as ck:
    ck.save(3, {"params": {"backbone": backbone, "head": {"fc": fc}}},
            metadata={"model": {"variant": "Mu/4", "image_size": 32}, "experiment": "finetune",
                      "settings": {"head.features": "mean"}})
  step = tmp_path / "ft" / "checkpoints" / "3"
  shutil.copytree(step, tmp_path / "copied" / "3")
  features, head = convert.classifier_head(str(tmp_path / "copied" / "3"), width)
  assert features == "mean"
  np.testing.assert_array_equal(head["head.weight"], fc["kernel"].T)
  np.testing.assert_array_equal(head["head.bias"], fc["bias"])
  other = tmp_path / "other"
  shutil.copytree(step, other / "checkpoints" / "3")
  (other / "config.json").write_text(json.dumps({"head": {"features": "mean"}}))
  assert convert.classifier_head(str(other), width)[0] == "mean"
  (other / "config.json").write_text(json.dumps({"head": {"features": "cls"}}))
  with pytest.raises(convert.ConversionError, match=r"The classifier of .*other/checkpoints/3 "
                     r"was trained on head.features='mean' \(its metadata\), but the "
                     r"config.json in .*other says 'cls'"):
    convert.classifier_head(str(other), width)


def test_unknown_and_missing_keys_are_listed(reference):
  state = load_file(str(reference / "timm.safetensors"))
  damaged = {**state, "blocks.3.attn.proj.scale": np.ones(384, np.float32)}
  del damaged["blocks.3.attn.qkv.bias"]
  listed = (r"missing \(1\): blocks\.3\.attn\.qkv\.bias.*unexpected \(1\): "
            r"blocks\.3\.attn\.proj\.scale")
  with pytest.raises(convert.ConversionError, match=listed):
    convert.torch_to_params(damaged)
  with pytest.raises(convert.ConversionError, match="fc_norm"):
    convert.backbone_state({**state, "fc_norm.weight": np.ones(384, np.float32)})
  # Tokens besides CLS are named (the error was a non-square grid, or a missing cls_token).
  token = np.zeros((1, 1, 384), np.float32)
  deit = {**state, "dist_token": token, "pos_embed": np.zeros((1, 198, 384), np.float32)}
  sit_v1 = {**state, "rot_token": token, "contrastive_token": token, "pos_embed": deit["pos_embed"]}
  del sit_v1["cls_token"]
  for found, named in ((deit, r"dist_token \(DeiT's distillation token\)"),
                       (sit_v1, r"rot_token \(SiT v1's rotation token\), contrastive_token")):
    with pytest.raises(convert.ConversionError, match=f"^The checkpoint has {named}.*: tokens "
                       "besides CLS, .* cannot be converted.$"):
      convert.backbone_state(found)
  with pytest.raises(convert.ConversionError, match="No sit_jax variant"):
    convert.torch_to_params(state, num_heads=5)


def test_to_jax_writes_no_export_into_a_directory_of_other_files(reference, tmp_path):
  """An export in a workdir would stand in for the run's checkpoints wherever --config.init
  names the workdir: to-jax writes only to a new or empty directory or (--overwrite) an export."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  with pytest.raises(convert.ConversionError, match=r"run holds other files \(checkpoints, "
                     r"config\.json\): write the export to a new or empty directory"):
    convert.to_jax(str(reference / "timm.safetensors"), str(workdir), overwrite=True)
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]


def test_half_precision_safetensors_become_float32(reference, tmp_path):
  """Weights stored in float16 become float32 parameters, as from a .pth (whose tensors torch
  upcasts): fine-tuning must not keep half-precision master weights and Adam moments."""
  state = load_file(str(reference / "timm.safetensors"))
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()}
  params, _ = convert.torch_to_params(half)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  np.testing.assert_array_equal(params["cls_token"].ravel(),
                                half["cls_token"].astype(np.float32).ravel())


def test_a_truncated_file_or_the_wrong_kind_of_input_is_one_line(reference, tmp_path):
  data = (reference / "timm.safetensors").read_bytes()
  truncated = tmp_path / "cut.safetensors"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match="cut.safetensors is not a readable "
                     r".safetensors file .*truncated\?"):
    convert.load_file(str(truncated))
  with pytest.raises(convert.ConversionError, match="is a directory, not a .pth/.pt/.safetensors"):
    convert.load_file(str(tmp_path))  # e.g. a sit_jax export, which needs no conversion
  with pytest.raises(convert.ConversionError, match="cut.safetensors is a file: to-timm reads a "
                     "sit_jax workdir, checkpoint step or backbone export"):
    convert.to_timm(str(truncated), str(tmp_path / "out.safetensors"))
  # A linear probe's workdir holds neither a backbone of its own nor a head timm computes.
  from configs import linear as linear_config
  from sit_jax import metrics
  probe = linear_config.get_config("runlocal")
  for init, read, named in (
      ("/ckpt/sit_vits", None, "convert that one: --input=/ckpt/sit_vits"),
      ("", None, r"it was a random init \(config.init=''\), nothing trained to convert"),
      # The step it read (results.json), which the pretraining's latest may no longer be.
      ("/ckpt/sit_vits", "/ckpt/sit_vits/checkpoints/800",
       "convert that one: --input=/ckpt/sit_vits/checkpoints/800")):
    probe.init = init
    metrics.write_json(tmp_path / "probe" / "config.json", probe.to_dict())
    if read:
      metrics.write_json(tmp_path / "probe" / "results.json", {"init_checkpoint": read})
    with pytest.raises(convert.ConversionError, match=r"probe is the workdir of a linear run, "
                       r"which evaluates the frozen backbone of its config.init and saves no "
                       rf"backbone of its own .*; {named}\.$"):
      convert.to_timm(str(tmp_path / "probe"), str(tmp_path / "out.safetensors"))
  assert not (tmp_path / "out.safetensors").exists()


# Runs `convert.main` on each argument list of argv[1] (JSON) and prints (exit code, stderr) of
# each as JSON: one child process for many PyTorch files.
CONVERT_EACH = textwrap.dedent("""
    import contextlib, io, json, sys
    from sit_jax import convert
    results = []
    for args in json.loads(sys.argv[1]):
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        results.append((convert.main(args), err.getvalue()))
    print(json.dumps(results))
    """)


def test_command_line_errors_name_the_problem(reference, tmp_path):
  """One line each, exit code 1: weights of no ViT name the keys found; a download that failed
  (an HTML page, an empty file) or was cut off is named as such, with or without
  --unsafe_pickle (it was told to pass --unsafe_pickle, or a traceback)."""
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "odd.safetensors"))
  data = (reference / "dino_style.pth").read_bytes()
  files = {"page.pth": b"<!DOCTYPE html><html><body>Not Found</body></html>", "empty.pth": b"",
           "cut.pth": data[:len(data) // 2]}
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  runs = [["to-jax", f"--input={tmp_path / name}", f"--output={tmp_path / 'out'}", *unsafe]
          for name in ("odd.safetensors", *files) for unsafe in ([], ["--unsafe_pickle"])]
  proc = run_python("-c", CONVERT_EACH, json.dumps(runs))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  want = [r"Missing 'cls_token', .* the state dict has: encoder\.weight\.",
          r"page\.pth is not a PyTorch file \(it begins b'<!DOCTYPE html>.*\): a failed or "
          r"cut-off download\? Fetch it again\.",
          r"empty\.pth is not a PyTorch file \(it is empty\): a failed or cut-off download\? "
          r"Fetch it again\.",
          r"cut\.pth is not a readable PyTorch file \(.*\); is it truncated or corrupt\? Fetch "
          r"it again\."]
  for (code, stderr), pattern in zip(results, [p for p in want for _ in range(2)]):
    assert code == 1 and stderr.count("\n") == 1, stderr
    assert re.match(f"sit_jax.convert: error: .*{pattern}$", stderr), stderr
  assert not (tmp_path / "out").exists()


def test_the_gmml_authors_checkpoint_layout(reference):
  """GMML's main.py saves {'SiT_model': DDP(backbone + head_recons).state_dict(), 'optimizer',
  'epoch', 'args', 'fp16_scaler'}: its backbone is found, the reconstruction head dropped."""
  state = load_file(str(reference / "timm.safetensors"))
  model = {f"module.backbone.{k}": v for k, v in state.items()}
  model["module.head_recons.convTrans.weight"] = np.zeros((384, 3, 16, 16), np.float32)
  saved = {"SiT_model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
           "epoch": 3, "fp16_scaler": {"scale": 1.0}}
  found, where = convert.find_state_dict(saved)
  backbone, dropped = convert.backbone_state(found)
  assert where == "SiT_model" and dropped == ["head_recons.convTrans.weight"]
  jax.tree.map(np.testing.assert_array_equal, convert.torch_to_params(backbone)[0],
               convert.torch_to_params(state)[0])
  # A self-distillation checkpoint that kept one network: the line says how to take it.
  with pytest.raises(convert.ConversionError, match=r"no 'teacher' entry \(keys: student\): "
                     r"pass --use=student to convert the student.$"):
    convert.find_state_dict({"student": model})


def test_weights_given_as_config_init_are_told_to_convert(reference):
  from sit_jax import config_check
  config = config_check.load("configs/knn.py:runlocal")
  config.init = str(reference / "timm.safetensors")
  with pytest.raises(config_check.ConfigError, match=r"is a file; PyTorch and safetensors weights "
                     r"are converted first: python -m sit_jax.convert to-jax --input .*"):
    config_check.check(config)
