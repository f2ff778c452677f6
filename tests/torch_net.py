"""A small PyTorch CNN as a PyTorch team would ship it (for the ONNX tests and benchmark)."""


def small_torch_net(size: int, classes: int = 3):
    """NCHW, one channel, logits; BatchNorm (folded at export), depthwise, residual add, concat, max-pool."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
            self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(12 * (size // 4) ** 2, classes)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            x = x + torch.relu(self.dw(x))
            x = torch.cat([x, torch.relu(self.pw(x))], 1)
            return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net
