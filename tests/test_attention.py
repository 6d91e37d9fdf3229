"""The attention switch (model.attention = ''/None, 'xla', 'cudnn') against a hand-written attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sit_jax.models import vit


def manual_attention(params, x, num_heads):
  """Multi-head softmax attention in numpy (float64) from the Attention module's parameters."""
  x = np.asarray(x, np.float64)
  batch, tokens, width = x.shape
  head_dim = width // num_heads
  qkv = x @ np.asarray(params["qkv"]["kernel"], np.float64) + np.asarray(params["qkv"]["bias"])
  qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  scores -= scores.max(axis=-1, keepdims=True)
  weights = np.exp(scores)
  weights /= weights.sum(axis=-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
  return out @ np.asarray(params["proj"]["kernel"], np.float64) + np.asarray(params["proj"]["bias"])


@pytest.fixture(scope="module")
def mu_vit():
  """Mu/4 ViT parameters with non-trivial biases, and a batch of images."""
  model = vit.backbone_from_config(dict(variant="Mu/4", image_size=32))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  # Random biases and LayerNorm scales too: initial zeros/ones would hide mistakes.
  params = jax.tree.map(
      lambda l: l + jnp.asarray(0.05 * rng.standard_normal(l.shape), l.dtype), params)
  return params, images


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_attention_module_matches_manual_softmax_attention(mu_vit, implementation):
  params, _ = mu_vit
  attn_params = params["params"]["blocks_0"]["attn"]
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 65, 96)), jnp.float32)
  module = vit.Attention(num_heads=3, implementation=implementation)
  got = module.apply({"params": attn_params}, x)
  want = manual_attention(attn_params, x, num_heads=3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_vit_outputs_do_not_depend_on_the_cpu_attention_choice(mu_vit):
  params, images = mu_vit
  outputs = {}
  for attention in ("", "xla"):
    model = vit.backbone_from_config(dict(variant="Mu/4", image_size=32, attention=attention))
    out = model.apply(params, images)
    outputs[attention] = np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["patches"])], 1)
  np.testing.assert_allclose(outputs[""], outputs["xla"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla_attention_on_gpu(mu_vit):
  params, images = mu_vit
  outputs = {}
  for attention in ("xla", "cudnn"):
    # cuDNN's fused attention takes bf16/fp16 inputs.
    model = vit.backbone_from_config(dict(variant="Mu/4", image_size=32, attention=attention,
                                          dtype="bfloat16"))
    outputs[attention] = np.asarray(model.apply(params, images)["patches"], np.float32)
  np.testing.assert_allclose(outputs["cudnn"], outputs["xla"], rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_attention_off_a_gpu_is_one_clear_error():
  with pytest.raises(ValueError, match="needs a GPU and model.dtype bfloat16 or float16, not cpu"):
    vit.backbone_from_config(dict(variant="Mu/4", image_size=16, attention="cudnn",
                                  dtype="bfloat16"))
