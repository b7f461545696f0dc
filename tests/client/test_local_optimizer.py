"""LocalOptimizer is torch.optim.SGD / Adam step for step, and local training never imports
torch._dynamo (the start-up cost the own optimizer exists to avoid)."""

import subprocess
import sys

import pytest
import torch

from confide.client.trainer import LocalOptimizer
from confide.round import TrainSettings


@pytest.mark.parametrize("optimizer,momentum,weight_decay", [
    ("sgd", 0.0, 0.0), ("sgd", 0.9, 0.0), ("sgd", 0.9, 1e-3), ("sgd", 0.0, 1e-2),
    ("adam", 0.0, 0.0), ("adam", 0.0, 1e-3),
])
def test_matches_torch_optim(optimizer, momentum, weight_decay):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
            for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    s = TrainSettings(epochs=1, batch_size=1, lr=0.05, momentum=momentum,
                      weight_decay=weight_decay, optimizer=optimizer)
    mine = LocalOptimizer(ours, s)
    theirs = (torch.optim.Adam(ref, lr=s.lr, weight_decay=weight_decay)
              if optimizer == "adam" else
              torch.optim.SGD(ref, lr=s.lr, momentum=momentum, weight_decay=weight_decay))
    for step in range(6):
        mine.zero_grad()
        theirs.zero_grad(set_to_none=True)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            if step == 2 and i == 1:
                continue  # a parameter without a gradient this step is left alone
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


def test_local_training_does_not_import_dynamo():
    code = (
        "import sys, torch\n"
        "from confide.client.trainer import LocalTrainer\n"
        "from confide.round import TrainSettings\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "t = LocalTrainer(m, torch.device('cpu'))\n"
        "x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))\n"
        "from confide.parameters import get_flat_params\n"
        "for opt in ('sgd', 'adam'):\n"
        "    s = TrainSettings(epochs=1, batch_size=5, lr=0.1, momentum=0.9, weight_decay=0.0,\n"
        "                      optimizer=opt)\n"
        "    t.fit(x, y, get_flat_params(m), s)\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
