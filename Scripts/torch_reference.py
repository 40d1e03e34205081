"""Reference values for Kappa's tests from PyTorch, in Float64: the pooling and resize options
PyTorch users reach for (ceil_mode, count_include_pad=False, align_corners=True), forward
values and vector-Jacobian products for a fixed input and output gradient.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch
    /tmp/peers/bin/python Scripts/torch_reference.py > Tests/KappaTests/torch_reference.json

The input and the output gradient are written out too, so the test does not depend on
PyTorch's random generator. The committed file was made with PyTorch 2.15.0.
"""
import json

import torch
import torch.nn.functional as F

torch.manual_seed(0)
x = torch.randn(2, 3, 7, 6, dtype=torch.float64)

cases = [
    ("maxPool2d", dict(kernel=3, stride=2, padding=1, ceilMode=True), lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True)),
    ("maxPool2d", dict(kernel=2, stride=2, padding=0, ceilMode=True), lambda t: F.max_pool2d(t, 2, 2, 0, ceil_mode=True)),
    ("avgPool2d", dict(kernel=3, stride=2, padding=1, ceilMode=False, countIncludePad=False),
     lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=False, count_include_pad=False)),
    ("avgPool2d", dict(kernel=3, stride=2, padding=1, ceilMode=True, countIncludePad=True),
     lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=True)),
    ("avgPool2d", dict(kernel=2, stride=2, padding=1, ceilMode=True, countIncludePad=False),
     lambda t: F.avg_pool2d(t, 2, 2, 1, ceil_mode=True, count_include_pad=False)),
    ("resized", dict(height=11, width=4, mode="bilinear", alignCorners=True),
     lambda t: F.interpolate(t, size=(11, 4), mode="bilinear", align_corners=True)),
    ("resized", dict(height=5, width=9, mode="bicubic", alignCorners=True),
     lambda t: F.interpolate(t, size=(5, 9), mode="bicubic", align_corners=True)),
    ("resized", dict(height=1, width=3, mode="bilinear", alignCorners=True),
     lambda t: F.interpolate(t, size=(1, 3), mode="bilinear", align_corners=True)),
]

out = {"torch": torch.__version__, "input": {"shape": list(x.shape), "values": x.flatten().tolist()}, "cases": []}
for i, (op, args, f) in enumerate(cases):
    t = x.clone().requires_grad_(True)
    y = f(t)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
    y.backward(g)
    out["cases"].append({"op": op, "args": args, "shape": list(y.shape), "values": y.detach().flatten().tolist(),
                         "outputGradient": g.flatten().tolist(), "inputGradient": t.grad.flatten().tolist()})
print(json.dumps(out))
