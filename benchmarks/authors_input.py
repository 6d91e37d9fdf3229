"""The authors' per-image input pipeline on the CPU (a re-implementation of their recipe, not
their code), shared by torch_reference.py (the step in PyTorch) and input_pipeline.py (host
images/s): per image, two views of torchvision RandomResizedCrop(224, 0.2-1, bicubic) + flip +
ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 + grayscale p 0.2 + PIL Gaussian blur (p 1 / 0.1) +
solarize (view 2, p 0.2) + normalise, GMML noise blocks with numpy in a Python loop; then per
image with probability 1/2 blocks replaced from another image of the batch. Needs torchvision.
"""
import random

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def gmml_blocks(x, fill, ratio, rng, align=1, max_block=0.3):
  """Corrupts one (C, H, W) float array in place with random blocks until the drawn area is
  covered; `fill(r, c, h, w)` gives the block's new pixels. Returns the (H, W) mask."""
  _, h, w = x.shape
  target = rng.uniform(min(0.5, ratio), ratio) * h * w
  max_h, max_w = int(h * max_block), int(w * max_block)
  mask = np.zeros((h, w), np.float32)
  while mask.sum() < target:
    r = rng.integers(0, h - align + 1) // align * align
    c = rng.integers(0, w - align + 1) // align * align
    bh = round(min(rng.integers(align, max_h + 1), h - r) / align) * align
    bw = round(min(rng.integers(align, max_w + 1), w - c) / align) * align
    x[:, r:r + bh, c:c + bw] = fill(r, c, bh, bw)
    mask[r:r + bh, c:c + bw] = 1.0
  return mask


class AuthorsInput:
  """The authors' per-image input work on the CPU (module doc: "input"): their Dataset's
  __getitem__ (two augmented views, GMML noise blocks) and collate function (blocks replaced
  from another image with probability 1/2)."""

  def __init__(self, image_size, seed=0):
    from torchvision import transforms as T
    from PIL import ImageFilter, ImageOps

    self.rng = np.random.default_rng(seed)
    self.pyrng = random.Random(seed)

    class Blur:
      def __init__(self, p, rng):
        self.p, self.rng = p, rng

      def __call__(self, img):
        if self.rng.random() > self.p:
          return img
        return img.filter(ImageFilter.GaussianBlur(radius=self.rng.uniform(0.1, 2.0)))

    class Solarize:
      def __init__(self, p, rng):
        self.p, self.rng = p, rng

      def __call__(self, img):
        return ImageOps.solarize(img) if self.rng.random() < self.p else img

    common = [T.RandomResizedCrop(image_size, scale=(0.2, 1.0),
                                  interpolation=T.InterpolationMode.BICUBIC),
              T.RandomHorizontalFlip(),
              T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(p=0.2)]
    tail = [T.ToTensor(), T.Normalize(MEAN, STD)]
    self.view1 = T.Compose(common + [Blur(1.0, self.pyrng)] + tail)
    self.view2 = T.Compose(common + [Blur(0.1, self.pyrng), Solarize(0.2, self.pyrng)] + tail)

  def __call__(self, images):
    """PIL images -> (clean, corrupted, mask) float32 arrays of both views, (2B, 3, S, S) each."""
    rng = self.rng
    clean, corrupted, masks = [[], []], [[], []], [[], []]
    for img in images:  # the dataset's __getitem__: augment and corrupt each view
      for v, transform in enumerate((self.view1, self.view2)):
        x = transform(img).numpy()
        xc = x.copy()
        m = gmml_blocks(xc, lambda r, c, h, w: rng.standard_normal((3, h, w), np.float32),
                        0.5, rng)
        clean[v].append(x)
        corrupted[v].append(xc)
        masks[v].append(m)
    for v in range(2):  # the collate function: with probability 1/2 re-corrupt by replacement
      n = len(images)
      for i in range(n):
        if rng.random() < 0.5:
          donor = clean[v][(i + 1 + rng.integers(0, n - 1)) % n]
          xc = clean[v][i].copy()
          masks[v][i] = gmml_blocks(xc, lambda r, c, h, w: donor[:, r:r + h, c:c + w], 0.3, rng)
          corrupted[v][i] = xc
    stack = lambda parts: np.stack(parts[0] + parts[1])
    return stack(clean), stack(corrupted), stack(masks)
