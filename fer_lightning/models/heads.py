"""Task heads on top of backbone features: expression logits, valence/arousal, landmarks."""

from __future__ import annotations

from torch import Tensor, nn

NUM_LANDMARKS = 68


class MultiTaskHead(nn.Module):
    """Maps (B, feat_dim) features to a dict: logits (B, C), va (B, 2) in [-1, 1], landmarks (B, 68, 2) in [0, 1]."""

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        *,
        va: bool = True,
        landmarks: bool = False,
        dropout: float = 0.0,
        hidden: int = 0,
    ):
        super().__init__()
        if feat_dim < 1:
            raise ValueError(f"MultiTaskHead: feat_dim must be >= 1 (got {feat_dim})")
        if num_classes < 1:
            raise ValueError(f"MultiTaskHead: num_classes must be >= 1 (got {num_classes}); check data.classes")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1) (got {dropout!r})")
        if hidden < 0:
            raise ValueError(f"head.hidden must be >= 0 (got {hidden!r}); 0 means linear heads on the features")
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        width = feat_dim
        if hidden > 0:
            layers += [nn.Linear(feat_dim, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.va = nn.Linear(width, 2) if va else None
        self.landmarks = nn.Linear(width, NUM_LANDMARKS * 2) if landmarks else None

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """Outputs keyed by task; va and landmarks only when enabled."""
        h = self.trunk(features)
        out = {"logits": self.classifier(h)}
        if self.va is not None:
            out["va"] = self.va(h).tanh()
        if self.landmarks is not None:
            out["landmarks"] = self.landmarks(h).sigmoid().reshape(-1, NUM_LANDMARKS, 2)
        return out
