"""Zero-centred RMSNorm, as in every norm of Step 3.5: `y = x * rsqrt(mean(x^2) + eps) * (1 + w)`.

The weight is stored as an offset from one (initialised to zero) and the arithmetic runs in fp32
whatever the input dtype, as the release was trained.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
