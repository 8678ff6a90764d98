"""Face embeddings of many images: decode, normalise, forward (image + its horizontal flip, summed)."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from data import decode_image, to_tensor


def _pixels(images, start: int, stop: int, input_size: int, describe) -> np.ndarray:
    """uint8 RGB (n, S, S, 3) for images[start:stop] (encoded bytes are decoded and resized)."""
    if isinstance(images, np.ndarray):
        batch = images[start:stop]
        if batch.dtype != np.uint8 or batch.shape[1:] != (input_size, input_size, 3):
            raise ValueError(f"image array must be uint8 (N, {input_size}, {input_size}, 3) RGB, "
                             f"got {images.dtype}{images.shape}")
        return batch
    items = ((i, images[i]) for i in range(start, min(stop, len(images))))
    return np.stack([item if isinstance(item, np.ndarray) else
                     decode_image(item, size=input_size, source=describe(i)) for i, item in items])


def _image_number(index: int) -> str:
    return f"image {index}"


@torch.inference_mode()
def embed_images(model, images, input_size: int, batch_size: int = 64, flip: bool = True, device="cpu",
                 with_norms: bool = False, workers: int | None = None, progress: bool = False,
                 separate_flip: bool = False, describe=_image_number):
    """Embeddings (float32 (N, D), not normalised) of ``images`` with ``model`` (already on ``device``).

    ``images``: a sequence of encoded images (bytes, decoded as RGB at ``input_size``) or of uint8 RGB
    arrays (S, S, 3), or a uint8 RGB array (N, S, S, 3). With ``flip`` the embedding of each image and of its
    horizontal flip are summed (the standard verification protocol); with ``separate_flip`` too, they are
    returned unsummed as (N, 2, D). Every image is embedded (no dropped last batch); the model runs in
    eval mode and its previous train/eval mode is restored. Decoding of the next batches overlaps the
    forward pass in ``workers`` threads. With ``with_norms`` returns ``(embeddings, norms)`` where
    ``norms`` (N,) is the mean L2 norm of the image's un-summed views (insightface's per-image "XNorm").
    ``describe(i)`` names image ``i`` (its file, record key, ...) in the error of an undecodable image.
    """
    count = len(images)
    workers = workers or min(4, os.cpu_count() or 1)
    was_training = model.training
    model.eval()
    embeddings, norms = [], []
    bar = tqdm(total=count, unit="img", disable=not progress)
    pending = deque()

    def forward_oldest():
        _forward(model, pending.popleft().result(), flip, device, embeddings, norms, separate_flip)
        bar.update(embeddings[-1].shape[0])

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, count, batch_size):
                pending.append(pool.submit(_pixels, images, start, start + batch_size, input_size, describe))
                if len(pending) > workers:  # keep `workers` batches decoding ahead of the forward pass
                    forward_oldest()
            while pending:
                forward_oldest()
    finally:
        bar.close()
        model.train(was_training)
    if not embeddings:
        raise ValueError("no images to embed")
    result = np.concatenate(embeddings).astype(np.float32, copy=False)
    return (result, np.concatenate(norms).astype(np.float32, copy=False)) if with_norms else result


def _forward(model, pixels: np.ndarray, flip: bool, device, embeddings: list, norms: list,
             separate_flip: bool = False) -> None:
    """Append the batch's (flip-summed, or (n, 2, D) unsummed) embeddings and mean view norms to the lists."""
    x = to_tensor(pixels).to(device, non_blocking=True)
    n = x.shape[0]
    out = model(torch.cat([x, x.flip(3)]) if flip else x).float()
    views = out.view(2, n, -1) if flip else out.view(1, n, -1)
    embeddings.append((views.transpose(0, 1) if flip and separate_flip else views.sum(0)).cpu().numpy())
    norms.append(views.norm(dim=2).mean(0).cpu().numpy())
