"""Joins KappaBench's and the PyTorch peer's `name<TAB>seconds` results into one table, one
group of columns per thread count: compare.py THREADS KAPPA.tsv TORCH.tsv [THREADS KAPPA.tsv TORCH.tsv ...].

A name may appear once per round (compare.sh's ROUNDS, the two sides alternating): each side's
column is the median of its rounds, and the ratio the median of the per-round ratios, with
their range when there is more than one."""
import statistics
import sys


def read(path):
    out = {}
    for line in open(path):
        if "\t" in line:
            name, value = line.rstrip("\n").split("\t")
            out.setdefault(name, []).append(float(value))
    return out


def ratio(k, t):
    if not k or not t:
        return "–"
    rounds = [a / b for a, b in zip(k, t)]
    text = f"**{statistics.median(rounds):.2f}**"
    if len(rounds) > 1:
        text += f" ({min(rounds):.2f}–{max(rounds):.2f})"
    return text


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


def main(args):
    runs = [(args[i], read(args[i + 1]), read(args[i + 2])) for i in range(0, len(args), 3)]
    names = []
    for _, kappa, _ in runs:
        names += [n for n in kappa if n not in names]
    header = "| workload |" + "".join(f" Kappa {t}T | PyTorch {t}T | ratio {t}T |" for t, _, _ in runs)
    print(header)
    print("|---|" + "---:|---:|---:|" * len(runs))
    for name in names:
        row = f"| {name} |"
        for _, kappa, torch in runs:
            k, t = kappa.get(name), torch.get(name)
            median = lambda v: statistics.median(v) if v else None
            row += f" {show(name, median(k))} | {show(name, median(t))} | {ratio(k, t)} |"
        print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
