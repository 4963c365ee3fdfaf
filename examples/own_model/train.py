"""Train examples/own_model/net.py:Net on the bundled digits and save it as a state dict.

    python examples/own_model/train.py OUT.pt [--epochs 8]

Plain PyTorch, nothing from explainfix: this stands for the model you already have. Beside OUT it
also writes the two halves of the bundled validation digits, as a user has a validation and a
test split: `val_a.npz` (for the prune's saliency and fine-tuning's best epoch) and `test_b.npz`
(touched by nothing that chooses, so the accuracy measured there is not a selection figure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from net import Net

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    train = np.load(SAMPLES / "digits_train.npz")
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        val = np.load(SAMPLES / "digits_val.npz")
        model.eval()
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(val["x"])).argmax(1) == torch.from_numpy(val["y"])).float().mean().item()
        print(f"epoch {epoch + 1}: held-out accuracy {accuracy:.3f}", file=sys.stderr)
    torch.save(model.state_dict(), args.out)
    half = len(val["y"]) // 2
    np.savez(args.out.with_name("val_a.npz"), x=val["x"][:half], y=val["y"][:half])
    np.savez(args.out.with_name("test_b.npz"), x=val["x"][half:], y=val["y"][half:])


if __name__ == "__main__":
    main()
