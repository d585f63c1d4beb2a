"""What one training step optimizes, for the trainer to call the same way for every model.

- :class:`PairedObjective` (seed 000 "Examples (B)"; also U-Net, Hi-Net and pix2pix): the
  generator maps T1w/T2w to the CE-T1w of the same slice; L1 (weight 100, as pix2pix; the seed
  gives none) plus the least-squares adversarial loss against a conditional PatchGAN; with
  seed 002's confidence module (MMgSN-Net ``confidence=True``) also CG-SAMR's confidence map
  loss on the half-resolution intermediate image, L_CM = mean(c |y_half - y|) - lambda
  mean(log c), weighted like the L1 term, with lambda 0.1 until the mean confidence exceeds
  0.7 and 0.03 from then on (seed 002, section IV-B); and the Laplace likelihood of the
  VCE's own error for the full-resolution error head (on detached inputs: it cannot change
  the VCE). Hi-Net adds its modality networks' reconstruction L1 of each input, weight 20
  each against the synthesis L1's 100 (the weights of Hi-Net's public training code, kept
  in the seed authors' MMgSN-Net repository): without it 3.8 M of Hi-Net's 13 M parameters
  (the modality decoders) would never learn. IMPORTANT-Net (seed 003) adds its parameter
  reconstructors' L1 of each input, weight 25 (its lambda_2; the model says so,
  ``reconstruction_weight``). Seed 003's VGG19 perceptual loss (weight 200) is not used:
  ImageNet weights cannot be downloaded here, and a VGG trained on our simulated slices would
  measure the simulator's textures, not perception.
- :class:`CycleObjective` (CycleGAN, Zhu et al. 2017, a baseline of seed 000 Table 2): one
  modality and the CE-T1w as two unpaired domains; generators both ways, one unconditional
  PatchGAN per domain, least-squares adversarial losses, cycle-consistency L1 (weight 10) and
  identity L1 (half the cycle weight), both as the CycleGAN paper sets them. The CE slices it
  sees in a step are drawn independently of the input slices, so it never uses the pairing.

Both run under mixed precision on CUDA (loss scaling for fp16) and DistributedDataParallel
when ``torchrun`` starts several processes; their ``modules`` are what a resumable training
state must hold.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import synthesis

#: CycleGAN's identity loss weight relative to its cycle weight (Zhu et al. 2017, sec. 5.2:
#: 0.5 x lambda).
IDENTITY_FRACTION = 0.5

#: CG-SAMR's confidence regulariser weight: 0.1, then 0.03 once the mean confidence is above
#: 0.7 (seed 002, section IV-B).
CONFIDENCE_LAMBDA = (0.1, 0.03)
CONFIDENCE_SWITCH = 0.7

#: Hi-Net's reconstruction L1 weight per input modality (its training code: 100 x synthesis
#: L1 + 20 x each reconstruction L1).
RECONSTRUCTION_WEIGHT = 20.0


class ConfidenceRegularizer:
    """The current lambda of the confidence map loss, kept in the resumable training state
    (it switches once, when the mean confidence first exceeds :data:`CONFIDENCE_SWITCH`)."""

    def __init__(self) -> None:
        self.value = CONFIDENCE_LAMBDA[0]

    def update(self, mean_confidence: float) -> None:
        if mean_confidence > CONFIDENCE_SWITCH:
            self.value = CONFIDENCE_LAMBDA[1]

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def error_loss(vce: torch.Tensor, log_error: torch.Tensor, target: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Laplace negative log-likelihood of the VCE's error, |y - y_hat| / b + log b with
    b = exp(log_error) (the VCE detached: only the error head learns from it); its optimum is
    b = E|y - y_hat|, the expected absolute error. With ``mask``, the mean over its pixels."""
    log_b = log_error.float().clamp(-9.0, 5.0)
    error = (vce.detach().float() - target.float()).abs()
    likelihood = error * torch.exp(-log_b) + log_b
    if mask is None:
        return likelihood.mean()
    weight = mask.float()
    return (likelihood * weight).sum() / weight.sum().clamp_min(1.0)


#: |error| floor of the quantile loss (normalised units): below a thousandth of an SD the
#: logarithm would spend the fit on differences no confidence shows.
QUANTILE_FLOOR = 1e-3


def quantile_error_loss(vce: torch.Tensor, log_error: torch.Tensor, target: torch.Tensor,
                        quantile: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pinball loss of the error head for the ``quantile`` of the VCE's absolute error: taken
    on log |y - y_hat| against the head's log b, since a quantile survives the logarithm (the
    q-quantile of log|e| is the log of the q-quantile of |e|) and in log units the loss does
    not weigh a pixel by its error's scale. Its optimum is the error that the VCE exceeds
    with probability 1 - ``quantile`` (VCE detached, as in ``error_loss``)."""
    log_b = log_error.float().clamp(-9.0, 5.0)
    log_e = torch.log((vce.detach().float() - target.float()).abs() + QUANTILE_FLOOR)
    residual = log_e - log_b
    pinball = torch.maximum(quantile * residual, (quantile - 1.0) * residual)
    if mask is None:
        return pinball.mean()
    weight = mask.float()
    return (pinball * weight).sum() / weight.sum().clamp_min(1.0)


def confidence_loss(intermediate: torch.Tensor, confidence: torch.Tensor, target: torch.Tensor,
                    weight: float) -> torch.Tensor:
    """CG-SAMR's L_CM (seed 002 eq. 1), averaged over pixels: the target at the intermediate
    image's half resolution (2 x 2 mean), its absolute error weighted by the confidence, minus
    ``weight`` times the mean log confidence (which keeps c from collapsing to 0)."""
    half = F.avg_pool2d(target.float(), 2)
    c = confidence.float().clamp_min(1e-6)
    return (c * (intermediate.float() - half).abs()).mean() - weight * torch.log(c).mean()


def _hidden(x: torch.Tensor, channels: list[int], present: list[bool]) -> torch.Tensor:
    """``x`` with the channels of absent inputs set to 0."""
    absent = [c for c, p in zip(channels, present, strict=True) if not p]
    if not absent:
        return x
    x = x.clone()
    x[:, absent] = 0.0
    return x


class ModalityDropout:
    """Seed 003's absent sequences, in training: with ``probability`` a micro-batch hides a
    random non-empty proper subset of the generator's inputs (``present`` flags), so that one
    checkpoint learns to synthesize from any of them. The draws depend only on the seed and
    their count, which the training state keeps (a resumed run draws as an uninterrupted
    one)."""

    def __init__(self, count: int, probability: float, seed: int) -> None:
        self.count, self.probability, self.seed = count, probability, seed
        self.draws = 0

    def draw(self) -> list[bool]:
        rng = np.random.default_rng([self.seed, self.draws, 13])
        self.draws += 1
        if self.count < 2 or rng.random() >= self.probability:
            return [True] * self.count
        kept = rng.choice(self.count, size=int(rng.integers(1, self.count)), replace=False)
        return [i in kept for i in range(self.count)]

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])


class _Step:
    """Optimizers, loss scalers, mixed precision and DDP wrapping shared by the objectives."""

    losses: tuple[str, ...] = ()
    #: whether a step takes CE slices drawn independently of the input slices
    unpaired = False

    def __init__(self, learning_rate: float, autocast: Any, scaling: bool, world: int,
                 device: torch.device, micro_batches: int = 1) -> None:
        self.learning_rate = learning_rate
        #: a step's batch is split into this many parts, each through the networks on its own
        #: (its own BatchNorm statistics), their losses averaged: one process then computes
        #: what as many DistributedDataParallel processes would (``--micro-batches``)
        self.micro_batches = micro_batches
        self.autocast = autocast
        self.scaling = scaling
        self.world = world
        self.device = device
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.trained: dict[str, nn.Module] = {}

    def _adam(self, name: str, *models: nn.Module) -> None:
        parameters = [p for m in models for p in m.parameters()]
        self.optimizers[name] = torch.optim.Adam(parameters, self.learning_rate,
                                                 betas=(0.5, 0.999))
        self.scalers[name] = torch.amp.GradScaler("cuda", enabled=self.scaling)

    def _wrap(self, name: str, model: nn.Module) -> nn.Module:
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # static_graph: the parameters a step uses are the same every step, found at the
            # first; a model that leaves some idle (an ablation's branch, a head another
            # objective trains) then trains instead of failing on the next step's reduction,
            # without find_unused_parameters' graph traversal at every step
            model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                            static_graph=True)
        self.trained[name] = model
        return model

    def _optimize(self, name: str, loss: torch.Tensor) -> None:
        optimizer, scaler = self.optimizers[name], self.scalers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def _precision(self) -> Any:
        return self.autocast or contextlib.nullcontext()

    @property
    def modules(self) -> dict[str, Any]:
        """Models, optimizers and (with fp16) loss scalers, by the names a state file uses."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor,
             unpaired: torch.Tensor | None = None) -> torch.Tensor:
        """One update from inputs ``x`` (B, 2, H, W: T1w, T2w) and targets ``y`` (B, 1, H, W);
        returns the losses (detached, float32) in the order of ``losses``."""
        raise NotImplementedError


def _lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores.float(), torch.full_like(scores.float(), 1.0 if real else 0.0))


class PairedObjective(_Step):
    """L1 + least-squares adversarial loss against a conditional PatchGAN (see module)."""

    losses = ("loss_g", "loss_l1", "loss_adv", "loss_d")

    def __init__(self, generator: nn.Module, discriminator: nn.Module, channels: list[int],
                 l1_weight: float, adversarial_weight: float, modality_dropout: float = 0.0,
                 seed: int = 0, **common: Any) -> None:
        super().__init__(**common)
        self.generator, self.discriminator = generator, discriminator
        self.dropout = (ModalityDropout(len(channels), modality_dropout, seed)
                        if modality_dropout > 0 else None)
        if self.dropout is not None and not getattr(generator, "accepts_subsets", False):
            raise ValueError("modality dropout needs a generator built to accept subsets of "
                             "its inputs (IMPORTANT-Net, accepts_subsets=True)")
        self.channels = channels
        self.l1_weight, self.adversarial_weight = l1_weight, adversarial_weight
        self.guided = getattr(generator, "guidance", None) is not None
        #: Hi-Net: its forward also reconstructs the inputs (``reconstruct=True``)
        self.reconstructing = callable(getattr(generator, "reconstruct", None))
        self.regularizer = ConfidenceRegularizer()
        if self.guided:
            self.losses = (*self.losses, "loss_cm", "confidence", "loss_error")
        if self.reconstructing:
            self.losses = (*self.losses, "loss_rec")
        self._adam("opt_g", generator)
        self._adam("opt_d", discriminator)
        self.g = self._wrap("generator", generator)
        self.d = self._wrap("discriminator", discriminator)

    @property
    def modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"generator": self.generator,
                                   "discriminator": self.discriminator, **self.optimizers}
        if self.guided:
            modules["confidence_lambda"] = self.regularizer
        if self.dropout is not None:
            modules["modality_dropout"] = self.dropout
        if self.scaling:
            modules.update(scaler_g=self.scalers["opt_g"], scaler_d=self.scalers["opt_d"])
        return modules

    def step(self, x: torch.Tensor, y: torch.Tensor,
             unpaired: torch.Tensor | None = None) -> torch.Tensor:
        parts = list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches), strict=True))
        n = len(parts)
        options: list[dict[str, Any]] = [{} for _ in parts]
        conditions = [xi for xi, _ in parts]  # what the discriminator is conditioned on
        if self.dropout is not None:
            options = [{"present": self.dropout.draw()} for _ in parts]
            # the generator gets every image and flags (its reconstructors learn from all of
            # them), the discriminator only what the generator may use
            conditions = [_hidden(xi, self.channels, o["present"])
                          for (xi, _), o in zip(parts, options, strict=True)]
        with self._precision():
            if self.guided:
                outputs = [self.g(xi[:, self.channels], aux=True) for xi, _ in parts]
                fakes = [out[0] for out in outputs]
            elif self.reconstructing:
                outputs = [self.g(xi[:, self.channels], reconstruct=True, **o)
                           for (xi, _), o in zip(parts, options, strict=True)]
                fakes = [out[0] for out in outputs]
            else:
                fakes = [self.g(xi[:, self.channels]) for xi, _ in parts]
            loss_d = sum(0.5 * (_lsgan(self.d(yi, ci), True)
                                + _lsgan(self.d(fake.detach(), ci), False))
                         for (_, yi), ci, fake in zip(parts, conditions, fakes, strict=True)) / n
        self._optimize("opt_d", loss_d)
        with self._precision():
            loss_adv = sum(_lsgan(self.d(fake, ci), True)
                           for ci, fake in zip(conditions, fakes, strict=True)) / n
            loss_l1 = sum(F.l1_loss(fake.float(), yi)
                          for (_, yi), fake in zip(parts, fakes, strict=True)) / n
            loss_g = self.adversarial_weight * loss_adv + self.l1_weight * loss_l1
            extra: list[torch.Tensor] = []
            if self.guided:
                loss_cm = sum(confidence_loss(out[1], out[2], yi, self.regularizer.value)
                              for (_, yi), out in zip(parts, outputs, strict=True)) / n
                loss_error = sum(error_loss(out[0], out[3], yi)
                                 for (_, yi), out in zip(parts, outputs, strict=True)) / n
                loss_g = loss_g + self.l1_weight * loss_cm + loss_error
                mean_confidence = sum(out[2].detach().float().mean() for out in outputs) / n
                extra = [loss_cm, mean_confidence, loss_error]
            if self.reconstructing:
                loss_rec = sum(F.l1_loss(rec.float(), xi[:, [c]])
                               for (xi, _), out in zip(parts, outputs, strict=True)
                               for c, rec in zip(self.channels, out[1:], strict=True)) / n
                weight = getattr(self.generator, "reconstruction_weight", RECONSTRUCTION_WEIGHT)
                loss_g = loss_g + weight * loss_rec
                extra = [loss_rec]
        self._optimize("opt_g", loss_g)
        if self.guided:
            self.regularizer.update(float(extra[1]))
        return torch.stack([v.detach().float()
                            for v in (loss_g, loss_l1, loss_adv, loss_d, *extra)])


class CycleObjective(_Step):
    """CycleGAN between one input modality and the CE-T1w (see module). ``generator`` maps the
    modality to CE-T1w (the model that is shipped), ``discriminator`` judges CE-T1w slices;
    the way back and the modality's discriminator are built here and kept in the state."""

    losses = ("loss_g", "loss_cycle", "loss_adv", "loss_d")
    unpaired = True

    def __init__(self, generator: nn.Module, discriminator: nn.Module, channels: list[int],
                 cycle_weight: float, adversarial_weight: float, **common: Any) -> None:
        super().__init__(**common)
        if len(channels) != 1:
            raise ValueError("CycleGAN translates one modality")
        if self.micro_batches != 1:
            raise ValueError("CycleGAN steps take the whole batch (no micro-batches)")
        self.channels = channels
        self.cycle_weight, self.adversarial_weight = cycle_weight, adversarial_weight
        config = dict(generator.config)
        config["inputs"] = ["ce"]
        self.generator = generator
        self.backward = synthesis.build_model("cyclegan", **config).to(common["device"])
        self.discriminator = discriminator
        self.input_discriminator = synthesis.build_model(
            "patchgan", **discriminator.config).to(common["device"])
        self._adam("opt_g", self.generator, self.backward)
        self._adam("opt_d", self.discriminator, self.input_discriminator)
        self.g_ab = self._wrap("generator", self.generator)
        self.g_ba = self._wrap("backward", self.backward)
        self.d_b = self._wrap("discriminator", self.discriminator)
        self.d_a = self._wrap("input_discriminator", self.input_discriminator)

    @property
    def modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"generator": self.generator, "backward": self.backward,
                                   "discriminator": self.discriminator,
                                   "input_discriminator": self.input_discriminator,
                                   **self.optimizers}
        if self.scaling:
            modules.update(scaler_g=self.scalers["opt_g"], scaler_d=self.scalers["opt_d"])
        return modules

    def step(self, x: torch.Tensor, y: torch.Tensor,
             unpaired: torch.Tensor | None = None) -> torch.Tensor:
        if unpaired is None:
            raise ValueError("CycleGAN steps take CE slices drawn apart from the inputs")
        a, b = x[:, self.channels], unpaired
        with self._precision():
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
            loss_adv = _lsgan(self.d_b(fake_b), True) + _lsgan(self.d_a(fake_a), True)
            loss_cycle = (F.l1_loss(self.g_ba(fake_b).float(), a)
                          + F.l1_loss(self.g_ab(fake_a).float(), b))
            identity = (F.l1_loss(self.g_ab(b).float(), b)
                        + F.l1_loss(self.g_ba(a).float(), a))
            loss_g = (self.adversarial_weight * loss_adv + self.cycle_weight * loss_cycle
                      + IDENTITY_FRACTION * self.cycle_weight * identity)
        self._optimize("opt_g", loss_g)
        with self._precision():
            loss_d = 0.5 * (_lsgan(self.d_b(b), True) + _lsgan(self.d_b(fake_b.detach()), False)
                            + _lsgan(self.d_a(a), True)
                            + _lsgan(self.d_a(fake_a.detach()), False))
        self._optimize("opt_d", loss_d)
        return torch.stack([v.detach().float() for v in (loss_g, loss_cycle, loss_adv, loss_d)])
