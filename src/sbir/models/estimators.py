"""Class-conditional estimators (generators) for data-free reconstruction.

The photo estimator and the sketch estimator share the noise z and the class y of each pair, so a
batch is a set of class-aligned photo/sketch pairs. Outputs are images in [0, 1] (sigmoid); the
sketch estimator draws one grey channel, repeated to 3 like real sketches.
"""
from __future__ import annotations

import torch
from torch import nn

from sbir.models.backbones import channels_last


class ConditionalEstimator(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, out_channels: int, width: int, image_size: int) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"estimator image_size must be a multiple of 8, got {image_size}")
        self.latent_dim, self.out_channels, self.image_size = latent_dim, out_channels, image_size
        self.init_size = image_size // 8
        c = width * 4
        self.class_embedding = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, c * self.init_size ** 2)
        self.c0 = c

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]

        self.body = channels_last(nn.Sequential(nn.BatchNorm2d(c), *up(c, c), *up(c, c // 2), *up(c // 2, width),
                                                nn.Conv2d(width, out_channels, 3, 1, 1)))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # multiplicative conditioning: the class gates the noise, so the output cannot ignore z as
        # easily as with concatenation (which collapsed to one image per class in our runs)
        h = self.fc(z * self.class_embedding(y))
        x = torch.sigmoid(self.body(h.view(-1, self.c0, self.init_size, self.init_size)))
        return x.expand(-1, 3, -1, -1) if self.out_channels == 1 else x


class EstimatorPair(nn.Module):
    """g_p and g_s conditioned on the same (z, y)."""

    def __init__(self, latent_dim: int, num_classes: int, width: int, image_size: int) -> None:
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        # the classes a batch is drawn from (class-split studies: only those some teacher knows)
        self.classes = torch.arange(num_classes)
        self.photo_estimator = ConditionalEstimator(latent_dim, num_classes, 3, width, image_size)
        self.sketch_estimator = ConditionalEstimator(latent_dim, num_classes, 1, width, image_size)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.photo_estimator(z, y), self.sketch_estimator(z, y)

    def sample_inputs(self, batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Shared noise and balanced classes. The second half repeats the first half's classes with
        other noise, so the diversity term can compare two samples of one class."""
        z = torch.randn(batch, self.latent_dim, generator=generator)
        half = (batch + 1) // 2
        y = self.classes[torch.arange(half) % len(self.classes)]
        y = y[torch.randperm(half, generator=generator)]
        y = torch.cat([y, y])[:batch]
        return z.to(device), y.to(device)
