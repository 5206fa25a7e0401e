"""Evaluation of frozen features: the weighted kNN monitor of the MoCo CIFAR demo, a linear probe
on every training label, and a linear probe on a few labels per class."""

from __future__ import annotations

import augment
import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def features(backbone, images_uint8, device, batch_size=1024, autocast=False):
    """L2-normalised backbone features of un-augmented images, float32, on ``device``."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(images_uint8), batch_size):
        batch = augment.plain(
            images_uint8[start : start + batch_size].to(device, non_blocking=True)
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(F.normalize(backbone(batch).float(), dim=1))
    backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_top1(
    train_features, train_labels, test_features, test_labels, classes, k=200, t=0.1, chunk=1000
) -> float:
    """Top-1 accuracy (percent) of a k-nearest-neighbour vote with weights exp(cos / t)."""
    k = min(k, len(train_labels))
    correct = 0
    for start in range(0, len(test_labels), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        weights, index = similarity.topk(k, dim=1)
        votes = F.one_hot(train_labels[index], classes).float() * (weights / t).exp().unsqueeze(-1)
        prediction = votes.sum(1).argmax(1)
        correct += (prediction == test_labels[start : start + chunk]).sum().item()
    return 100.0 * correct / len(test_labels)


def linear_probe_top1(
    train_features,
    train_labels,
    test_features,
    test_labels,
    classes,
    epochs=100,
    batch_size=1024,
    seed=0,
) -> float:
    """Top-1 accuracy (percent) of a linear classifier trained on frozen, standardised features,
    from zero weights (the problem is convex), with batches in an order drawn from ``seed``."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    generator = torch.Generator(device=train_x.device).manual_seed(seed)
    classifier = torch.nn.Linear(train_x.shape[1], classes).to(train_x.device)
    for parameter in classifier.parameters():
        torch.nn.init.zeros_(parameter)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=5e-4)
    steps = epochs * -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), device=train_x.device, generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(train_x[batch]), train_labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    with torch.no_grad():
        return 100.0 * (classifier(test_x).argmax(1) == test_labels).float().mean().item()


def few_label_probe_top1(
    train_features, train_labels, test_features, test_labels, per_class=1, draws=20, seed=0
) -> float:
    """Mean top-1 accuracy (percent) over ``draws`` draws of ``per_class`` labelled training
    images per class: an L2-regularised logistic regression (scikit-learn, C = 1) on frozen
    features standardised with the statistics of the whole (unlabelled) training set. The draws
    depend on ``seed`` and the labels only, so every network is probed on the same images."""
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = (f.double().cpu().numpy() for f in (train_features, test_features))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y, test_y = train_labels.cpu().numpy(), test_labels.cpu().numpy()
    generator = np.random.default_rng(seed)
    accuracies = []
    for _ in range(draws):
        labelled = np.concatenate(
            [
                generator.choice(np.flatnonzero(train_y == c), per_class, replace=False)
                for c in np.unique(train_y)
            ]
        )
        classifier = LogisticRegression(max_iter=1000).fit(train_x[labelled], train_y[labelled])
        accuracies.append((classifier.predict(test_x) == test_y).mean())
    return 100.0 * float(np.mean(accuracies))
