"""A network defined outside the package, as a user's own would be: what tests/test_networks.py trains by class path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyNet(nn.Module):
    """One strided convolution and one linear layer; outputs logits."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 5, stride=2)
        self.fc = nn.Linear(width * 12 * 12, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))
