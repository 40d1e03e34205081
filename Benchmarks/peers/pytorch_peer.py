"""PyTorch (eager, CPU) peer of Kappa's benchmarks: the same workloads as KappaBench
(BENCHMARKS.md), written for this comparison. Prints `name<TAB>seconds` lines (medians)
to the file given as the first argument. Run through compare.sh, which sets the threads.

The training step mirrors KappaSSL's ReferenceStep: a DINO ViT (patch embedding, [CLS],
learned positional embedding interpolated bicubically for the local crops, pre-norm blocks
with fused qkv, final LayerNorm), a DINO head (3 linear layers with GELU, L2 normalization,
a weight-normalized last layer with learnable g), the DINO-vMF loss (vMF logits with the
large-order normalizer, probability centering), per-parameter clipping at 3.0, AdamW and
the EMA teacher.
"""
import copy
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def median_time(fn, reps):
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


class Block(nn.Module):
    def __init__(self, d, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, int(d * mlp_ratio))
        self.fc2 = nn.Linear(int(d * mlp_ratio), d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (d // h) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, image, patch, channels, width, depth, heads, mask_token=False):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_token else None
        self.patch, self.grid = patch, image // patch
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.features = width

    def position(self, g):
        if g == self.grid:
            return self.pos
        grid = self.pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
        return torch.cat([self.pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)

    def tokens(self, x, mask=None):
        """All output tokens, [CLS] first; `mask` [B, N] (True = masked) swaps in the mask token."""
        b = x.shape[0]
        x = self.embed(x)
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.position(g)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.tokens(x)[:, 0]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """KappaNN's ResNet: a ResNet-18 layout of width w with a 3×3 stem and no max-pool."""

    def __init__(self, channels, width):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for stage in range(4):
            out = width << stage
            for i in range(2):
                blocks.append(BasicBlock(c, out, 2 if stage > 0 and i == 0 else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.features = c

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)


class Head(nn.Module):
    def __init__(self, d, hidden, bottleneck, prototypes, batch_norm=False):
        super().__init__()
        bn = (lambda: nn.BatchNorm1d(hidden)) if batch_norm else (lambda: nn.Identity())
        self.mlp = nn.Sequential(nn.Linear(d, hidden), bn(), nn.GELU(), nn.Linear(hidden, hidden), bn(), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.v = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)
        self.g = nn.Parameter(torch.ones(prototypes))

    def forward(self, x):
        y = F.normalize(self.mlp(x), dim=-1)
        return (y @ F.normalize(self.v, dim=-1).t()) * self.g, self.g.abs()


def log_cp_approx(kappa, p):
    nu = p / 2 - 1
    s = torch.sqrt(nu * nu + kappa * kappa)
    return nu * torch.log(nu + s) - s + 0.25 * torch.log(nu * nu + kappa * kappa)


class Step:
    def __init__(self, backbone, channels, batch, global_size, local_size, locals_, hidden, bottleneck, prototypes,
                 head_bn=False, ema=0.996):
        torch.manual_seed(0)
        self.student = backbone()
        width = self.student.features
        self.s_head = Head(width, hidden, bottleneck, prototypes, head_bn)
        self.ema = ema
        self.teacher, self.t_head = copy.deepcopy(self.student), copy.deepcopy(self.s_head)
        for q in list(self.teacher.parameters()) + list(self.t_head.parameters()):
            q.requires_grad_(False)
        params = list(self.student.named_parameters()) + list(self.s_head.named_parameters())
        decay = [q for n, q in params if q.ndim > 1]
        no_decay = [q for n, q in params if q.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=5e-4)
        self.center = torch.full((prototypes,), 1.0 / prototypes)
        self.batch, self.p = batch, bottleneck
        self.globals = torch.randn(2 * batch, channels, global_size, global_size)
        self.locals = torch.randn(locals_ * batch, channels, local_size, local_size)

    def logits(self, dots, norms, tau):
        return dots / tau + log_cp_approx(norms / tau, self.p)

    def __call__(self):
        b = self.batch
        with torch.no_grad():
            t_dots, t_norms = self.t_head(self.teacher(self.globals))
            t_logits = self.logits(t_dots, t_norms, 0.04)
            targets = F.softmax(t_logits - torch.log(self.center), dim=-1).chunk(2)
            q = F.softmax(t_logits, dim=-1).mean(0)
        g_dots, norms = self.s_head(self.student(self.globals))
        loss = self.cls_loss(targets, g_dots, norms)
        self.center = self.center * 0.9 + q * 0.1
        self.update(loss)
        return loss.item()

    def cls_loss(self, targets, g_dots, norms):
        """DINO-vMF's multi-crop cross-entropy over cross-view pairs (student local views here)."""
        b = self.batch
        l_dots, _ = self.s_head(self.student(self.locals))
        logp = [F.log_softmax(self.logits(d, norms, 0.1), dim=-1) for d in list(g_dots.chunk(2)) + list(l_dots.chunk(l_dots.shape[0] // b))]
        total, pairs = 0.0, 0
        for iq, target in enumerate(targets):
            for v, lp in enumerate(logp):
                if v != iq:
                    total = total + (-(target * lp).sum(-1).mean())
                    pairs += 1
        return total / pairs

    def update(self, loss):
        """Backward, per-parameter clipping at 3.0, AdamW, the EMA teacher."""
        self.opt.zero_grad()
        loss.backward()
        for m in (self.student, self.s_head):
            for q_ in m.parameters():
                if q_.grad is not None:
                    n = q_.grad.norm()
                    if n > 3.0:
                        q_.grad.mul_(3.0 / (n + 1e-6))
        self.opt.step()
        with torch.no_grad():
            for s_, t_ in zip(list(self.student.parameters()) + list(self.s_head.parameters()),
                              list(self.teacher.parameters()) + list(self.t_head.parameters())):
                t_.mul_(self.ema).add_(s_.detach(), alpha=1 - self.ema)


class IBOTStep(Step):
    """ref-ibot-micro: ref-micro with iBOT-vMF. Half of the global views get a mask of 10–50% of
    their patches (here random patches, not blocks: the same number of masked tokens and the
    same work), the student sees the masked views, the unmasked teacher's patch outputs are
    the targets of the masked-patch term (the shared head, its own center)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.patch_center = torch.full_like(self.center, 1.0 / self.center.numel())

    def masks(self, count, n):
        chosen = torch.rand(count) < 0.5
        ratio = 0.1 + 0.4 * torch.rand(count)
        k = (ratio * n).round().long()
        ranks = torch.rand(count, n).argsort(dim=1).argsort(dim=1)
        return (ranks < k.unsqueeze(1)) & chosen.unsqueeze(1)

    def __call__(self):
        b = self.batch
        n = self.student.grid ** 2
        mask = self.masks(2 * b, n)
        with torch.no_grad():
            t_tokens = self.teacher.tokens(self.globals)
            t_dots, t_norms = self.t_head(t_tokens[:, 0])
            t_logits = self.logits(t_dots, t_norms, 0.04)
            targets = F.softmax(t_logits - torch.log(self.center), dim=-1).chunk(2)
            q = F.softmax(t_logits, dim=-1).mean(0)
            tp_dots, _ = self.t_head(t_tokens[:, 1:].reshape(2 * b * n, -1))
            tp_logits = self.logits(tp_dots, t_norms, 0.04)
            p_targets = F.softmax(tp_logits - torch.log(self.patch_center), dim=-1).reshape(2 * b, n, -1).chunk(2)
            pq = F.softmax(tp_logits, dim=-1).mean(0)
        s_tokens = self.student.tokens(self.globals, mask)
        g_dots, norms = self.s_head(s_tokens[:, 0])
        cls = self.cls_loss(targets, g_dots, norms)
        sp_dots, _ = self.s_head(s_tokens[:, 1:].reshape(2 * b * n, -1))
        sp_logp = F.log_softmax(self.logits(sp_dots, norms, 0.1), dim=-1).reshape(2 * b, n, -1).chunk(2)
        masks = mask.float().chunk(2)
        patch = 0.0
        for target, lp, m in zip(p_targets, sp_logp, masks):
            per_patch = -(target * lp).sum(-1)
            patch = patch + ((per_patch * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        loss = cls + patch / 2
        self.center = self.center * 0.9 + q * 0.1
        self.patch_center = self.patch_center * 0.9 + pq * 0.1
        self.update(loss)
        return loss.item()


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    out = open(sys.argv[1], "a")
    sections = set(sys.argv[2:])

    def record(name, seconds):
        out.write(f"{name}\t{seconds}\n")
        out.flush()

    def wants(s):
        return not sections or s in sections

    if wants("matmul"):
        for n in (64, 256, 1024):
            a = torch.randn(n, n, requires_grad=True)
            b_ = torch.randn(n, n)
            record(f"matmul {n}³", median_time(lambda: a @ b_, 15 if n >= 1024 else 200))
        q, k = torch.randn(64, 3, 65, 64), torch.randn(64, 3, 65, 64)
        record("matmul batched 192×65×64×65", median_time(lambda: q @ k.transpose(-2, -1), 50))
    if wants("elementwise"):
        for n, label in ((1 << 20, "1M"), (1 << 24, "16M")):
            x, y = torch.randn(n), torch.randn(n)
            reps = 10 if n > 1 << 20 else 100
            rows = x.reshape(n // 1024, 1024)
            record(f"add {label}", median_time(lambda: x + y, reps))
            record(f"mul {label}", median_time(lambda: x * y, reps))
            record(f"gelu {label}", median_time(lambda: F.gelu(x), reps))
            record(f"exp {label}", median_time(lambda: torch.exp(x), reps))
            record(f"softmax {label}", median_time(lambda: rows.softmax(1), reps))
            xg = rows.clone().requires_grad_(True)
            go = torch.randn(n // 1024, 1024)
            record(f"softmax fwd+bwd {label}", median_time(lambda: (xg.softmax(1) * go).sum().backward(), reps))
            w, bias = torch.ones(1024, requires_grad=True), torch.zeros(1024, requires_grad=True)
            record(f"layerNorm fwd+bwd {label}",
                   median_time(lambda: (F.layer_norm(xg, (1024,), w, bias, 1e-6) * go).sum().backward(), reps))
            # BatchNorm in training mode on [N, 16, 32, 32] images, running statistics updated.
            images, image_grad = torch.randn(n // (16 * 1024), 16, 32, 32, requires_grad=True), go.reshape(-1, 16, 32, 32)
            bn_w, bn_b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
            running_mean, running_var = torch.zeros(16), torch.ones(16)
            record(f"batchNorm fwd+bwd {label}",
                   median_time(lambda: (F.batch_norm(images, running_mean, running_var, bn_w, bn_b, training=True,
                                                     momentum=0.1, eps=1e-5) * image_grad).sum().backward(), reps))
    if wants("overhead"):
        x = torch.randn(16, requires_grad=True)

        def chain(backward):
            y = x
            for i in range(1000):
                y = y * 1.0001 if i % 2 == 0 else y + 0.5
            if backward:
                y.sum().backward()
        record("per-op overhead forward (per op)", median_time(lambda: chain(False), 20) / 1000)
        record("per-op overhead forward+backward (per op)", median_time(lambda: chain(True), 20) / 1000)
    if wants("vmf"):
        kappa = (10 ** torch.empty(65536).uniform_(-2, 4)).requires_grad_(True)
        record("vMF log C_p approximate fwd (65,536 κ)", median_time(lambda: log_cp_approx(kappa, 256), 50))
        record("vMF log C_p approximate fwd+bwd (65,536 κ)", median_time(lambda: log_cp_approx(kappa, 256).sum().backward(), 50))
    steps = (("ref-micro", (lambda: ViT(28, 7, 1, 64, 4, 4), 1, 32, 28, 14, 4, 256, 64, 512)),
             ("ref-tiny", (lambda: ViT(32, 4, 3, 192, 6, 3), 3, 64, 32, 16, 6, 1024, 256, 4096)),
             ("ref-resnet", (lambda: ResNet(1, 8), 1, 64, 28, 14, 4, 256, 64, 256, True, 0.99)),
             ("ref-ibot-micro", (lambda: ViT(28, 7, 1, 64, 4, 4, mask_token=True), 1, 32, 28, 14, 4, 256, 64, 512)))
    for name, args in steps:
        if wants("step") or name in sections:
            step = (IBOTStep if name == "ref-ibot-micro" else Step)(*args)
            count = sum(q.numel() for q in list(step.student.parameters()) + list(step.s_head.parameters()))
            print(f"  PyTorch {name}: {count} student parameters")
            record(f"{name} training step", median_time(step, 5 if name == "ref-tiny" else 9))
            if name in ("ref-micro", "ref-tiny"):
                record(f"{name} peak resident MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
