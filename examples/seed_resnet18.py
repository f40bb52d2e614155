"""Seed post 000's ResNet-18 experiment, with its averaging classes taken from ``wavg_fused``.

The post trains a ResNet-18 with Adam on random images with random binary labels, updates an
``SWAModel``, an ``EMAModel`` and a ``T_ADEMAModel`` after every optimizer step, and evaluates the
live model and the three averages on a second random set. It checks that the loop runs; the
accuracies are those of a model guessing random labels (about 50%), not a measure of averaging.
For that, see ``examples/digits.py``.

Run it as in the post (5 epochs of 224 random 224x224 images, batch 32; the data is generated,
nothing is downloaded; a few minutes on a laptop CPU, seconds on a GPU)::

    python examples/seed_resnet18.py

or on a tiny budget (what CI runs)::

    python examples/seed_resnet18.py --epochs 1 --train-size 8 --test-size 4 --batch-size 4 --image-size 32

What differs from the post, and why:

* ``from wavg_fused import EMAModel, SWAModel, T_ADEMAModel`` replaces the post's class
  definitions (same constructors and defaults; T-ADEMA counts ``n`` once per update).
* ``resnet18(weights=None)`` is the post's ``resnet18(pretrained=False)``, which torchvision
  no longer accepts.
* The post moves everything to ``"cuda"`` for evaluation; here ``device`` is ``"cuda"`` when
  there is one and ``"cpu"`` otherwise. ``cuda=True`` is kept: without CUDA the averages stay
  on the CPU and ``wavg_fused`` says so once (a ``UserWarning``).
* Flags set the sizes the post hard-codes (defaults are the post's), a seed, and ``--out``
  writes the four accuracies as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision.models as models
from torch.utils.data import DataLoader
from tqdm import tqdm

from wavg_fused import EMAModel, SWAModel, T_ADEMAModel


class RandomDataset(torch.utils.data.Dataset):
    def __init__(self, size=224, image_size=224):
        self.data = torch.randn(size, 3, image_size, image_size)
        self.labels = torch.randint(0, 2, (size,))

    def __getitem__(self, index):
        return self.data[index], self.labels[index]

    def __len__(self):
        return len(self.data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=224)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the four accuracies to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # create the ResNet-18
    model = models.resnet18(weights=None)
    # model = model.to('cuda')
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    criterion = torch.nn.CrossEntropyLoss()

    # data loader
    train_dataset = RandomDataset(args.train_size, args.image_size)
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True)

    # the weight-averaged models
    swa_model = SWAModel(model, cuda=True)
    ema_model = EMAModel(model, cuda=True)
    t_adema_model = T_ADEMAModel(model, cuda=True)

    for epoch in range(args.epochs):
        for inputs, labels in tqdm(train_loader, desc=f"Epoch {epoch + 1}/{args.epochs}"):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

            # update the weight-averaged models
            ema_model.update(model)
            swa_model.update(model)
            t_adema_model.update(model)

    # test the models
    test_dataset = RandomDataset(args.test_size, args.image_size)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size, shuffle=False)

    def evaluate(model):
        model.eval()  # evaluation mode
        correct = 0
        total = 0

        with torch.no_grad():
            for inputs, labels in test_loader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                _, predicted = torch.max(outputs.data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()

        accuracy = correct / total
        print(f"accuracy: {accuracy * 100:.2f}%")
        return accuracy

    results = {}
    # the live model
    print("Model Evaluation:")
    results["model"] = evaluate(model.to(device))
    # the weight-averaged models
    print("SWAModel Evaluation:")
    results["swa"] = evaluate(swa_model.to(device))

    print("EMAModel Evaluation:")
    results["ema"] = evaluate(ema_model.to(device))

    print("T-ADEMAModel Evaluation:")
    results["t_adema"] = evaluate(t_adema_model.to(device))

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
