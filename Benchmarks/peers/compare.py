"""Joins KappaBench's and the PyTorch peer's `name<TAB>seconds` results into one table."""
import sys


def read(path):
    out = {}
    for line in open(path):
        if "\t" in line:
            name, value = line.rstrip("\n").split("\t")
            out[name] = float(value)
    return out


def show(name, v):
    if v is None:
        return "–"
    if name.endswith("MB"):
        return f"{v:.0f} MB"
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e6:.2f} µs"


kappa, torch = read(sys.argv[1]), read(sys.argv[2])
print("| workload | Kappa | PyTorch | Kappa / PyTorch |")
print("|---|---:|---:|---:|")
for name, k in kappa.items():
    t = torch.get(name)
    ratio = f"{k / t:.2f}" if t else "–"
    print(f"| {name} | {show(name, k)} | {show(name, t)} | {ratio} |")
