"""What averaging buys on real data: a small CNN on scikit-learn's digits, with EMA, SWA and T-ADEMA.

The digits set (1,797 8x8 grey images of handwritten digits, 10 classes) ships with scikit-learn,
so nothing is downloaded. A fixed stratified split (70% train, 30% test, ``random_state=0``) and a
fixed seed make the run repeatable. The CNN is trained with plain SGD at a constant learning rate
high enough that the live weights keep bouncing around the minimum; after every optimizer step
three ``wf.Averager`` copies are updated:

* ``EMA(decay)``, every step from the first;
* ``SWA()`` with ``update_after=`` the first ``--swa-start`` epochs' steps: a copy of the model
  until then, the equal-weight mean of every step's weights after;
* ``TADEMA(alpha)``, decay ``alpha * tanh(n)``.

After every epoch the live model and the three averages are evaluated on the test split (the
averages by forwarding through the averager). The CNN has no BatchNorm, so no statistics need
refreshing; with BatchNorm, run ``torch.optim.swa_utils.update_bn`` on the averaged module first.

Writes a JSON of per-epoch test accuracies (with the configuration and versions) and a PNG plot
next to it (matplotlib, imported only for the plot)::

    python examples/digits.py                                # defaults: well under a minute on one core
    python examples/digits.py --epochs 2 --out /tmp/d.json   # what CI runs
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn

import wavg_fused as wf

HERE = Path(__file__).resolve().parent


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as ``(N, 1, 8, 8)`` float images in [0, 1] and int64 labels: train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.3, random_state=seed, stratify=labels
    )

    def as_images(x):
        return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return as_images(x_train), torch.tensor(y_train), as_images(x_test), torch.tensor(y_test)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = net.training
    net.eval()
    correct = (net(x).argmax(1) == y).sum().item()
    net.train(was_training)
    return correct / len(y)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in LABELS.items():
        ax.plot(result["epochs"], result["accuracy"][name], label=label, lw=1.5 if name == "model" else 2)
    ax.axvline(cfg["swa_start"] + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, small CNN, SGD lr={cfg['lr']} (constant); dotted: SWA starts")
    low = min(min(v[cfg["swa_start"]:] or v) for v in result["accuracy"].values())
    ax.set_ylim(max(0.0, low - 0.02), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LABELS = {"model": "live model", "ema": "EMA", "swa": "SWA", "t_adema": "T-ADEMA"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "digits.json",
                        help="JSON of per-epoch accuracies; the PNG goes next to it")  # fmt: skip
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--t-adema-alpha", type=float, default=0.95)
    parser.add_argument("--swa-start", type=int, default=10, help="epochs before SWA starts averaging")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_split(args.seed)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    averages = {
        "ema": wf.Averager(model, wf.EMA(args.ema_decay)),
        "swa": wf.Averager(model, wf.SWA(), update_after=args.swa_start * steps_per_epoch),
        "t_adema": wf.Averager(model, wf.TADEMA(args.t_adema_alpha)),
    }
    history = {name: [] for name in LABELS}
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        for batch in order.split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for avg in averages.values():
                avg.update(model)
        history["model"].append(accuracy(model, x_test, y_test))
        for name, avg in averages.items():
            history[name].append(accuracy(avg, x_test, y_test))
        print(f"epoch {epoch:3d}  " + "  ".join(f"{LABELS[n]} {history[n][-1]:.4f}" for n in LABELS), flush=True)

    import sklearn

    last = min(10, args.epochs)
    result = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"},
                   "train_size": len(x_train), "test_size": len(x_test), "steps_per_epoch": steps_per_epoch},
        "epochs": list(range(1, args.epochs + 1)),
        "accuracy": history,
        "final": {name: acc[-1] for name, acc in history.items()},
        f"mean_last_{last}": {name: sum(acc[-last:]) / last for name, acc in history.items()},
        "environment": {"device": f"cpu ({platform.machine()}), {torch.get_num_threads()} thread(s)",
                        "torch": torch.__version__, "sklearn": sklearn.__version__,
                        "wavg_fused": wf.__version__, "commit": git_commit()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
