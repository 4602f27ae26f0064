"""The original network, as PyTorch defines it; mnist_flax.model.CNN mirrors it layer for layer."""

import torch
import torch.nn as nn
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 1, 28, 28) -> the floats the network was trained on."""
    return (pixels.float() / 255.0 - MNIST_MEAN) / MNIST_STD


class OriginalNet(nn.Module):
    """Conv(1->8) Conv(8->16) MaxPool Conv1x1(16->8) Conv(8->16) Conv(16->8) FC(512->10), BatchNorm+ReLU after each conv.

    Input: normalised NCHW float32 (N, 1, 28, 28). Output: logits (N, 10).
    """

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)
        self.conv5, self.bn5 = nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.relu(self.bn5(self.conv5(x)))
        return self.fc(torch.flatten(x, 1))
