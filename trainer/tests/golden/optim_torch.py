"""Golden values for trainer/src/optim/tests.rs: torch.optim.AdamW and SGD on fixed
parameters and gradients. Run once with any torch (not in CI):
    /tmp/venv-torch/bin/python trainer/tests/golden/optim_torch.py
and paste the printed arrays into the tests."""
import numpy as np
import torch

torch.set_default_dtype(torch.float32)
GRADS = [[0.5, -0.3, 2.0], [-0.1, 0.4, -1.5], [0.25, 0.25, 0.0], [1e-3, -2.0, 0.7]]
START = [1.0, -0.5, 0.25]


def run(make):
    p = torch.nn.Parameter(torch.tensor(START))
    opt = make([p])
    for g in GRADS:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().tolist()


def show(name, values):
    # Shortest text that parses back to the same f32.
    print(f"const {name}: [f32; 3] = [{', '.join(str(np.float32(v)) for v in values)}];")


show("TORCH_ADAMW", run(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)))
show("TORCH_SGD_NESTEROV", run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False)))
show("TORCH_SGD_MOMENTUM", run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.0, foreach=False)))
