"""The drop-in recipes (docs/recipes.md), run in loops shaped like the codebases they are for.

Each test trains a small model for several optimiser steps twice from the same weights and data:
once with the recipe (this library's loss, the codebase's queue layout and enqueue order, its raw
outputs) and once with a plain-PyTorch transcription of the same objective, and checks every step's
loss and gradients against each other. The models are written from the codebases' public structure:
the official MoCo builder (a (D, K) queue buffer, enqueue inside ``forward`` before the backward),
solo-learn's MoCo V2+ (one (D, K) queue per view, enqueue in ``training_step`` before the
backward), lightly (raw projection outputs, a memory bank of normalised keys, a dataset that
yields (views, targets, filenames)), and the SimCLR family: lightly's SimCLR example and
solo-learn's SimCLR ``training_step``, against transcriptions of their NT-Xent.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_symmetric import lightly_ntxent, solo_learn_simclr
from torch import nn

from sce_loss import InfoNCELoss, MemoryQueue, SCELoss, info_nce_loss, sce_loss

COEFF, TAU, TAU_M = 0.5, 0.1, 0.05
DIM, QUEUE, BATCH, STEPS = 16, 24, 8, 4


def plain_sce(q, k, bank):
    """SCE of normalised q, k (N, D) against a bank (K, D), written out: logits [q·k, q·bank] / τ,
    target [λ, (1−λ)·softmax(k·bank / τ_m)], loss −Σ target·log_softmax(logits), row mean."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], 1) / TAU
    with torch.no_grad():
        relations = torch.softmax(k @ bank.T / TAU_M, 1)
        target = torch.cat([torch.full_like(logits[:, :1], COEFF), (1 - COEFF) * relations], 1)
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, DIM)).double()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 10, generator=generator, dtype=torch.float64),
            torch.randn(BATCH, 10, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def assert_same_steps(model, twin, step, step_twin):
    """Run both loops step by step; their losses and gradients must agree at every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    optimizer_twin = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for images in batches():
        loss, loss_twin = step(model, images), step_twin(twin, images)
        optimizer.zero_grad()
        optimizer_twin.zero_grad()
        loss.backward()
        loss_twin.backward()
        torch.testing.assert_close(loss, loss_twin, rtol=1e-12, atol=1e-12)
        for p, p_twin in zip(model.parameters(), twin.parameters()):
            if p.grad is not None or p_twin.grad is not None:
                torch.testing.assert_close(p.grad, p_twin.grad, rtol=1e-10, atol=1e-12)
        optimizer.step()
        optimizer_twin.step()
        losses.append(loss.item())
    assert len(set(losses)) == STEPS  # the models moved: the steps are not repeats of the first


class MoCo(nn.Module):
    """The official MoCo builder's structure: query and momentum encoders, a (D, K) queue buffer
    initialised with normalised random columns, and ``forward`` that enqueues before returning."""

    def __init__(self, objective):
        super().__init__()
        self.encoder_q, self.encoder_k = encoder(), encoder()
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        torch.manual_seed(2)
        self.register_buffer(
            "queue", F.normalize(torch.randn(DIM, QUEUE, dtype=torch.float64), dim=0)
        )
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.objective = objective
        self.T = TAU  # the builder's configured temperature (--moco-t)

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.mul_(0.99).add_(p_q.detach(), alpha=0.01)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        ptr = int(self.queue_ptr)
        self.queue[:, ptr : ptr + keys.shape[0]] = keys.T
        self.queue_ptr[0] = (ptr + keys.shape[0]) % QUEUE

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        loss = self.objective(self, q, k)
        self._dequeue_and_enqueue(k)  # before the backward, as in the official code
        return loss


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_official_moco_builder(backend):
    def recipe(self, q, k):  # the recipe of docs/recipes.md, verbatim (but the backend)
        return sce_loss(
            q,
            k,
            self.queue.T,
            coeff=0.5,
            temperature=self.T,
            target_temperature=0.05,
            backend=backend,
        )

    def plain(self, q, k):
        return plain_sce(q, k, self.queue.clone().detach().T)

    assert_same_steps(MoCo(recipe), MoCo(plain), lambda m, x: m(*x), lambda m, x: m(*x))


class MoCoV2Plus(nn.Module):
    """solo-learn's MoCo V2+ structure: projector and momentum projector, a (2, D, K) queue (one
    bank per view), a symmetric loss of each view against the other view's keys and bank, and
    ``training_step`` that enqueues both views' keys before returning the loss."""

    def __init__(self, objective):
        super().__init__()
        self.projector, self.momentum_projector = encoder(), copy.deepcopy(encoder())
        for p in self.momentum_projector.parameters():
            p.requires_grad = False
        torch.manual_seed(3)
        self.register_buffer(
            "queue", F.normalize(torch.randn(2, DIM, QUEUE, dtype=torch.float64), dim=1)
        )
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.objective = objective
        self.temperature = TAU  # method_kwargs.temperature

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        ptr = int(self.queue_ptr)
        self.queue[:, :, ptr : ptr + keys.shape[1]] = keys.permute(0, 2, 1)
        self.queue_ptr[0] = (ptr + keys.shape[1]) % QUEUE

    def training_step(self, batch):
        x1, x2 = batch
        q1, q2 = (F.normalize(self.projector(x), dim=-1) for x in (x1, x2))
        with torch.no_grad():
            k1, k2 = (F.normalize(self.momentum_projector(x), dim=-1) for x in (x1, x2))
        loss = self.objective(self, q1, q2, k1, k2)
        self._dequeue_and_enqueue(torch.stack((k1, k2)))
        return loss


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_solo_learn_mocov2plus(backend):
    def recipe(self, q1, q2, k1, k2):  # the recipe of docs/recipes.md, verbatim (but the backend)
        queue = self.queue.clone().detach()  # (2, D, K)
        nce_loss = sce_loss(q1, k2, queue[1].T, temperature=self.temperature, backend=backend)
        return nce_loss

    def plain(self, q1, q2, k1, k2):
        return plain_sce(q1, k2, self.queue.clone().detach()[1].T)

    step = lambda model, batch: model.training_step(batch)  # noqa: E731
    assert_same_steps(MoCoV2Plus(recipe), MoCoV2Plus(plain), step, step)


class LightlyMoCo(nn.Module):
    """lightly's MoCo structure: a backbone + projection head giving raw (unnormalised) outputs,
    and momentum copies of both."""

    def __init__(self):
        super().__init__()
        self.backbone, self.projection_head = encoder(), nn.Linear(DIM, DIM).double()
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        for p in [
            *self.backbone_momentum.parameters(),
            *self.projection_head_momentum.parameters(),
        ]:
            p.requires_grad = False

    def forward(self, x):
        return self.projection_head(self.backbone(x))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_lightly(backend):
    criterion = SCELoss(normalize=True, backend=backend)  # the README's recipe
    queue = MemoryQueue(QUEUE, DIM, dtype=torch.float64)
    plain_bank = queue.keys.clone()
    plain_pointer = 0

    def recipe(model, batch):
        (x_query, x_key), _, _ = batch  # LightlyDataset: (views, targets, filenames)
        query = model(x_query)  # raw projection outputs
        key = model.forward_momentum(x_key)
        loss = criterion(query, key, queue.keys)
        if query.requires_grad:  # not in evaluation
            queue.push(F.normalize(key, dim=1))  # the bank holds normalised keys
        return loss

    def plain(model, batch):
        nonlocal plain_bank, plain_pointer
        (x_query, x_key), _, _ = batch
        q, k = F.normalize(model(x_query), dim=1), F.normalize(model.forward_momentum(x_key), dim=1)
        loss = plain_sce(q, k, F.normalize(plain_bank, dim=1))  # normalize=True: the bank too
        plain_bank = plain_bank.clone()
        plain_bank[plain_pointer : plain_pointer + BATCH] = k
        plain_pointer = (plain_pointer + BATCH) % QUEUE
        return loss

    model, twin = LightlyMoCo(), LightlyMoCo()
    as_lightly = lambda step: lambda m, views: step(m, (views, None, None))  # noqa: E731
    assert_same_steps(model, twin, as_lightly(recipe), as_lightly(plain))
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(QUEUE, dtype=torch.float64))
    torch.testing.assert_close(queue.keys, plain_bank)
    with torch.no_grad():  # an evaluation batch leaves the bank alone
        recipe(model, (batches()[0], None, None))
    torch.testing.assert_close(queue.keys, plain_bank)


class SimCLR(nn.Module):
    """lightly's SimCLR example: backbone + projection head, one network for both views."""

    def __init__(self):
        super().__init__()
        self.backbone, self.projection_head = encoder(), nn.Linear(DIM, DIM).double()

    def forward(self, x):
        return self.projection_head(self.backbone(x))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_lightly_simclr(backend):
    criterion = InfoNCELoss(temperature=0.5, symmetric=True, normalize=True, backend=backend)

    def step(criterion):
        def training_step(model, batch):
            x0, x1 = batch
            z0, z1 = model(x0), model(x1)
            return criterion(z0, z1)  # unchanged

        return training_step

    lightly_criterion = lambda z0, z1: lightly_ntxent(z0, z1, 0.5)  # noqa: E731
    assert_same_steps(SimCLR(), SimCLR(), step(criterion), step(lightly_criterion))


class SoloSimCLR(nn.Module):
    """solo-learn's SimCLR: the base method's ``training_step`` gives ``out["z"]``, one projection
    per large crop; the method's ``training_step`` computes the contrastive loss from it."""

    def __init__(self, objective):
        super().__init__()
        self.backbone, self.projector = encoder(), nn.Linear(DIM, DIM).double()
        self.temperature = 0.2  # method_kwargs.temperature
        self.objective = objective

    def training_step(self, batch):
        indexes, (x1, x2) = batch
        out = {"z": [self.projector(self.backbone(x)) for x in (x1, x2)]}
        return self.objective(self, out, indexes)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_solo_learn_simclr(backend):
    def recipe(self, out, indexes):  # the recipe of docs/recipes.md, verbatim (but the backend)
        z1, z2 = out["z"]
        nce_loss = info_nce_loss(
            z1,
            z2,
            symmetric=True,
            temperature=self.temperature,
            normalize=True,
            gather=True,
            backend=backend,
        )
        return nce_loss

    def solo(self, out, indexes):  # solo-learn's own lines
        z = torch.cat(out["z"])
        indexes = indexes.repeat(2)
        return solo_learn_simclr(z, indexes=indexes, temperature=self.temperature)

    step = lambda model, views: model.training_step((torch.arange(BATCH), views))  # noqa: E731
    assert_same_steps(SoloSimCLR(recipe), SoloSimCLR(solo), step, step)


# -- recipes with no new API: MoCo v3, NNCLR, CLIP ------------------------------------------------


def moco_v3_contrastive_loss(q, k, T):
    """facebookresearch/moco-v3, moco/builder.py ``MoCo.contrastive_loss``, one process (its
    concat_all_gather is the identity): CE(q·kᵀ / T, arange) × 2T, both normalised."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    labels = torch.arange(logits.shape[0], dtype=torch.long)
    return nn.CrossEntropyLoss()(logits, labels) * (2 * T)


class MoCoV3(nn.Module):
    """MoCo v3's builder: base + predictor online, a momentum encoder for the keys, symmetrised:
    contrastive_loss(q1, k2) + contrastive_loss(q2, k1), the keys computed without gradient."""

    def __init__(self, loss, T=0.2, m=0.99):
        super().__init__()
        self.base, self.predictor = encoder(), nn.Linear(DIM, DIM).double()
        self.momentum = copy.deepcopy(self.base).requires_grad_(False)
        self.loss, self.T, self.m = loss, T, m

    def forward(self, x1, x2):
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        with torch.no_grad():
            for p, p_m in zip(self.base.parameters(), self.momentum.parameters()):
                p_m.mul_(self.m).add_(p.detach(), alpha=1 - self.m)
            k1, k2 = self.momentum(x1), self.momentum(x2)
        return self.loss(q1, k2, self.T) + self.loss(q2, k1, self.T)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_moco_v3(backend):
    def recipe(q, k, T):  # docs/recipes.md: contrastive_loss, gathered keys, CE × 2τ
        return (
            2 * T * info_nce_loss(q, k, temperature=T, normalize=True, gather=True, backend=backend)
        )

    step = lambda model, views: model(*views)  # noqa: E731
    assert_same_steps(MoCoV3(recipe), MoCoV3(moco_v3_contrastive_loss), step, step)


def solo_learn_nnclr_loss(nn_, p, temperature):
    """solo-learn, solo/losses/nnclr.py ``nnclr_loss_func``, one process (gather is the identity):
    CE(normalise(nn)·normalise(p)ᵀ / τ, arange)."""
    nn_, p = F.normalize(nn_, dim=-1), F.normalize(p, dim=-1)
    logits = nn_ @ p.T / temperature
    return F.cross_entropy(logits, torch.arange(nn_.size(0)))


class SoloNNCLR(nn.Module):
    """solo-learn's NNCLR: projector z (normalised) and predictor p per view; the positive of
    view 1 is the support queue's nearest neighbour of z1 (``find_nn``), compared with p2; the
    queue (K, D) is filled with z1 after the loss (``dequeue_and_enqueue``)."""

    def __init__(self, loss, find_nn, temperature=0.2, queue_size=2 * BATCH):
        super().__init__()
        self.backbone, self.projector = encoder(), nn.Linear(DIM, DIM).double()
        self.predictor = nn.Linear(DIM, DIM).double()
        generator = torch.Generator().manual_seed(5)
        queue = torch.randn(queue_size, DIM, generator=generator, dtype=torch.float64)
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.loss, self.find_nn, self.temperature = loss, find_nn, temperature

    def training_step(self, x1, x2):
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        nn1, nn2 = self.find_nn(z1, self.queue), self.find_nn(z2, self.queue)
        loss = self.loss(nn1, p2, self.temperature) / 2 + self.loss(nn2, p1, self.temperature) / 2
        with torch.no_grad():  # dequeue_and_enqueue(z1)
            ptr = int(self.queue_ptr)
            self.queue[ptr : ptr + BATCH] = z1
            self.queue_ptr[0] = (ptr + BATCH) % len(self.queue)
        return loss


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_solo_learn_nnclr(backend):
    from sce_loss import nearest_neighbours

    def recipe(nn_, p, temperature):  # docs/recipes.md
        return info_nce_loss(
            nn_, p, temperature=temperature, normalize=True, gather=True, backend=backend
        )

    def find_nn(z, queue):  # solo-learn's own lines
        idx = (z @ queue.T).max(dim=1)[1]
        return queue[idx]

    step = lambda model, views: model.training_step(*views)  # noqa: E731
    assert_same_steps(
        SoloNNCLR(recipe, nearest_neighbours), SoloNNCLR(solo_learn_nnclr_loss, find_nn), step, step
    )


def open_clip_loss(image_features, text_features, logit_scale):
    """mlfoundations/open_clip, ``ClipLoss.forward`` on one process: the two directions'
    cross-entropies of logit_scale × image·textᵀ against arange, halved."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0])
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


class CLIP(nn.Module):
    """Two towers with normalised outputs and a learnable logit scale, kept as its logarithm
    (initialised at log(1/0.07)), as open_clip's CLIP model; the loss gets logit_scale.exp()."""

    def __init__(self, loss):
        super().__init__()
        self.visual, self.text = encoder(), nn.Linear(10, DIM).double()
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07, dtype=torch.float64).log())
        self.loss = loss

    def forward(self, image, text):
        image_features = F.normalize(self.visual(image), dim=-1)
        text_features = F.normalize(self.text(text), dim=-1)
        return self.loss(image_features, text_features, self.logit_scale.exp())


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_open_clip(backend):
    def recipe(image_features, text_features, logit_scale):  # docs/recipes.md
        tau = 1 / logit_scale  # a 0-d tensor: learnable
        options = dict(temperature=tau, gather=True, backend=backend)
        return (
            info_nce_loss(image_features, text_features, **options)
            + info_nce_loss(text_features, image_features, **options)
        ) / 2

    step = lambda model, views: model(*views)  # noqa: E731
    model, twin = CLIP(recipe), CLIP(open_clip_loss)
    assert_same_steps(model, twin, step, step)
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
