"""The PyTorch peer of the pretraining step, for the bfloat16 target against it.

    python3.11 -m venv /tmp/torch_env
    /tmp/torch_env/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/torch_env/bin/python bench/torch_peer.py [--precision=bfloat16|float32]

The same work as `bench/pretrain_throughput.py`'s step at its defaults: torchvision's ResNet-18
with the CIFAR stem (3x3 convolution, stride 1, no max-pool), SimCLR v2's three-layer projection
head to 128, NT-Xent at temperature 0.5 over both views of a batch of 256 32x32 images (512
forward passes), backward, and an SGD step with momentum and weight decay (LARS adds a few
element-wise ops per variable; PyTorch has none built in). One fixed batch, channels-last
layout (oneDNN's preferred one), `torch.autocast` for bfloat16, two threads (or --threads).
Prints images per second (pairs, as the project's figures count them) over --steps steps after
--warmup steps. Needs PyTorch, which the project does not install: it runs in its own
environment and imports nothing from the project.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="Timed rounds of --steps each.")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build(torch, torchvision):
    """ResNet-18 with the CIFAR stem, and the three-layer projection head of SimCLR v2."""
    nn = torch.nn
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    head = nn.Sequential(
        nn.Linear(512, 512, bias=False),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, 512, bias=False),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, 128, bias=False),
        nn.BatchNorm1d(128),
    )
    return nn.Sequential(net, head).to(memory_format=torch.channels_last)


def nt_xent(torch, z, temperature: float):
    """SimCLR's loss over 2N projections: each view's positive is the other view of its image;
    the other 2N - 2 projections are its negatives."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    logits = z @ z.t() / temperature
    logits = logits - 1e9 * torch.eye(2 * n, device=z.device)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return torch.nn.functional.cross_entropy(logits, targets)


def main(argv: list[str] | None = None) -> dict:
    import torch
    import torchvision

    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(torch, torchvision)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    views = torch.rand(2 * args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.bfloat16):
            z = model(views)
        loss = nt_xent(torch, z, 0.5)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - started) / args.steps
        rates.append(args.batch_size / seconds)
    result = {
        "torch": torch.__version__,
        "precision": args.precision,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "images_per_s": [round(r, 1) for r in rates],
        "median_images_per_s": round(statistics.median(rates), 1),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
