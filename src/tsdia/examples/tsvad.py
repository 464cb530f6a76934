"""The built-in example: target-speaker voice activity detection (TS-VAD) on synthetic mixtures.

Each example is a mixture of 1-3 speakers over `num_frames` feature frames plus the enrollment embedding
of one of them (the target); the label is the target's per-frame activity. A speaker's spectral
signature is a fixed non-linear function of its embedding, so the model must learn to match the
embedding against the mixture. Everything is generated on the fly from `(seed, index)`: the same
index always gives the same example, in any process, on any worker.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class SyntheticMixtures(Dataset[dict[str, torch.Tensor]]):
    """Deterministic synthetic TS-VAD examples."""

    def __init__(
        self,
        size: int,
        speakers: torch.Tensor,
        signatures: torch.Tensor,
        num_frames: int,
        max_speakers_per_mix: int,
        seed: int,
    ) -> None:
        self.size = size
        self.speakers = speakers
        self.signatures = signatures
        self.num_frames = num_frames
        self.max_speakers = max_speakers_per_mix
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n_present = int(torch.randint(1, self.max_speakers + 1, (1,), generator=g))
        present = torch.randperm(len(self.speakers), generator=g)[:n_present]
        activity = torch.stack([_segments(self.num_frames, g) for _ in range(n_present)])  # [S, T]
        gains = 0.5 + torch.rand(n_present, 1, generator=g)
        features = (activity * gains).T @ self.signatures[present]  # [T, F]
        features = features + 0.3 * torch.randn(features.shape, generator=g)
        target = int(torch.randint(0, n_present, (1,), generator=g))
        enrollment = self.speakers[present[target]] + 0.1 * torch.randn(self.speakers.shape[1], generator=g)
        return {
            "features": features,
            "target_embedding": F.normalize(enrollment, dim=0),
            "labels": activity[target],
        }


def _segments(num_frames: int, g: torch.Generator) -> torch.Tensor:
    """A speaker's on/off activity: a two-state Markov chain with turns of ~15 frames."""
    flips = torch.rand(num_frames, generator=g) < 1 / 15
    start = torch.rand(1, generator=g) < 0.5
    return ((torch.cumsum(flips.long(), 0) + start.long()) % 2).float()


def build_datasets(
    num_train: int = 2048,
    num_val: int = 256,
    num_frames: int = 100,
    feat_dim: int = 40,
    emb_dim: int = 32,
    num_speakers: int = 24,
    max_speakers_per_mix: int = 3,
    seed: int = 0,
) -> tuple[SyntheticMixtures, SyntheticMixtures]:
    """The train and validation sets: same speakers, different mixtures."""
    g = torch.Generator().manual_seed(seed)
    speakers = F.normalize(torch.randn(num_speakers, emb_dim, generator=g), dim=1)
    mixing = torch.randn(emb_dim, feat_dim, generator=g) * 2.0
    signatures = F.softplus(speakers @ mixing)  # the voice is a function of the embedding
    train = SyntheticMixtures(num_train, speakers, signatures, num_frames, max_speakers_per_mix, seed + 1)
    val = SyntheticMixtures(num_val, speakers, signatures, num_frames, max_speakers_per_mix, seed + 2)
    return train, val


class LinearAttention(nn.Module):
    """Non-causal linear attention (elu+1 feature map): O(T) in the sequence length."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        kv = torch.einsum("bthd,bthe->bhde", k, v)
        norm = 1.0 / (torch.einsum("bthd,bhd->bth", q, k.sum(1)) + 1e-6)
        y = torch.einsum("bthd,bhde,bth->bthe", q, kv, norm)
        return self.out(y.reshape(b, t, d))


class LinearAttentionLayer(nn.Module):
    """Pre-norm encoder layer with linear attention and a feed-forward block."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = LinearAttention(d_model, num_heads)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class TargetSpeakerVAD(nn.Module):
    """Mixture features + target-speaker embedding -> per-frame activity of that speaker.

    `forward(batch)` returns `{"loss", "accuracy"}`: the trainer's model contract is a dict holding a
    scalar `loss` plus any scalar metrics to average during validation.
    """

    def __init__(
        self,
        feat_dim: int = 40,
        emb_dim: int = 32,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        encoder: str = "transformer",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if encoder not in ("transformer", "linear_attention"):
            raise ValueError(f"encoder must be 'transformer' or 'linear_attention', got {encoder!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.feature_projection = nn.Linear(feat_dim, d_model)
        self.embedding_scale = nn.Linear(emb_dim, d_model)
        self.embedding_shift = nn.Linear(emb_dim, d_model)
        self.positions = nn.Parameter(torch.zeros(1, 512, d_model))
        layers: list[nn.Module]
        if encoder == "transformer":
            layers = [
                nn.TransformerEncoderLayer(
                    d_model, num_heads, 4 * d_model, dropout, batch_first=True, norm_first=True
                )
                for _ in range(num_layers)
            ]
        else:
            layers = [LinearAttentionLayer(d_model, num_heads, dropout) for _ in range(num_layers)]
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 1))
        nn.init.normal_(self.positions, std=1 / math.sqrt(d_model))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features, embedding = batch["features"], batch["target_embedding"]
        h = self.feature_projection(features)
        h = (
            h * (1 + torch.tanh(self.embedding_scale(embedding)))[:, None]
            + self.embedding_shift(embedding)[:, None]
        )
        h = self.encoder(h + self.positions[:, : h.shape[1]])
        logits = self.head(h).squeeze(-1)
        labels = batch["labels"]
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits > 0).float() == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}
