"""granq_ao.relu: the ReLU-output predicate's data-flow finder, with plain torch modules only."""
import torch
import torch.nn.functional as F

from granq_ao.relu import find_relu_fed_modules


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 1)   # image input: no
        self.b = torch.nn.Conv2d(4, 4, 1)   # functional relu: yes
        self.c = torch.nn.Conv2d(4, 4, 1)   # relu then in-place add: no
        self.d = torch.nn.Conv2d(4, 4, 1)   # nn.ReLU6 (hardtanh 0..6): yes
        self.e = torch.nn.Linear(16, 2)     # relu then reshape: no
        self.f = torch.nn.Linear(16, 2)     # in-place tensor.relu_(): yes
        self.g = torch.nn.Linear(16, 2)     # called twice, once on a ReLU output, once not: no
        self.unused = torch.nn.Linear(2, 2)  # never called: not listed
        self.relu6 = torch.nn.ReLU6()
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.a(x))
        y = self.b(F.relu(y))
        r = torch.relu(y)
        r += 1.0
        y = self.c(r)
        y = self.d(self.relu6(y))
        flat = y.flatten(1)[:, :16]
        self.e(torch.relu(flat).reshape(-1, 16))
        self.g(flat)
        self.g(F.relu(flat))
        return self.f(flat.clone().relu_())


def test_find_relu_fed_modules_follows_data_flow_without_side_effects():
    model = Net().train()
    running_mean = model.bn.running_mean.clone()
    candidates = {name: module for name, module in model.named_modules() if name}
    found = find_relu_fed_modules(model, torch.randn(2, 3, 2, 2), candidates)
    assert found == ["b", "d", "f"]
    assert model.training and model.bn.training  # training flags restored
    assert torch.equal(model.bn.running_mean, running_mean)  # the pass ran in eval mode
    assert not model.a._forward_pre_hooks  # hooks removed
    assert find_relu_fed_modules(model, (torch.randn(2, 3, 2, 2),), {"b": model.b}) == ["b"]  # tuple inputs
