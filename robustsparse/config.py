"""Typed run configuration: nested dataclasses, loadable from YAML, with ``section.key=value`` overrides.

Every field is type-checked against its annotation and range-checked in ``validate``; an unknown key names the
closest valid one. ``RunConfig.to_dict()`` is what a run folder records as ``config.yaml`` (fully resolved).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources

import yaml

from .errors import UserError

SEARCH_PRESETS = ("short", "faithful")  # prune.preset; their values: prune/presets.py


@dataclass
class DataConfig:
    name: str = "digits"
    root: typing.Optional[str] = None  # folder of on-disk datasets (cifar10, svhn, mnist, ...)
    val_size: typing.Optional[int] = None  # held-out validation images (None: the dataset's default)
    crop_padding: int = 0  # random-crop augmentation padding in pixels (0: none)
    flip: bool = False  # random horizontal flip augmentation
    options: dict = field(default_factory=dict)  # reader options, e.g. synthetic {shape: [3, 32, 32]}


@dataclass
class ModelConfig:
    name: str = "cnn"
    mean: typing.Optional[list[float]] = None  # per-channel normalisation applied inside the model
    std: typing.Optional[list[float]] = None
    options: dict = field(default_factory=dict)  # architecture options, e.g. {width: 64} or {dropout: 0.3}


@dataclass
class AttackConfig:
    """The training-time attack (PGD-AT's PGD, TRADES' KL-PGD)."""
    eps: float = 8 / 255
    norm: str = "Linf"
    steps: int = 10
    alpha: typing.Optional[float] = None  # step size; None: 2.5·eps/steps (Madry et al.)
    random_start: bool = True
    # TRADES' KL-PGD: clip the noisy start x + 0.001·N(0, I) to [0, 1] before the first gradient (our earlier way;
    # the reference clips only after each step). docs/reference-differences.md
    trades_clamp_start: bool = False


@dataclass
class TrainConfig:
    method: str = "pgd_at"  # standard | pgd_at | trades | fgsm_at
    trades_beta: float = 6.0
    # train-mode forwards per TRADES step: 3 (x, x_adv, x again for the KL target, as the reference's trades_loss)
    # or 2 (the clean logits reused as the KL target: same loss and gradients, one forward cheaper, but BN
    # running statistics see the clean batch once less). docs/reference-differences.md
    trades_forwards: int = 3
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | multistep | constant
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # multistep, as fractions of training
    val_every: int = 1  # validate every N epochs (and always after the last)
    val_attack_steps: int = 10  # PGD-k on the validation split selects the best checkpoint
    checkpoint_every_steps: int = 0  # also save 'last' every N optimizer steps (0: at epoch ends only)
    probe_every: int = 0  # record NTK and outputs on a fixed adversarial probe every N epochs (analysis/dynamics.py)
    ticket: typing.Optional[str] = None  # a `robustsparse prune` output folder: start from its mask and weights
    keep_epochs: list[int] = field(default_factory=list)  # also keep checkpoints/epoch-<k> after epoch k (IMP rewind)
    max_loss_factor: float = 50.0  # stop as diverged when the mean loss > this x ln(classes) (0: NaN/inf only)
    on_overfit: str = "warn"  # catastrophic overfitting (train/guards.py): warn | stop
    overfit_drop: float = 0.2  # ... flagged when val robust accuracy falls more than this below its best
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Engine (train/engine.py); none of these changes the algorithm, only how fast the step runs
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32) | bf16 | fp16 | fp32
    channels_last: typing.Optional[bool] = None  # NHWC memory format; None: on for CUDA, off on CPU
    compile: bool = False  # torch.compile the model the objective calls
    sync_bn: bool = True  # under torchrun: BatchNorm uses the global batch's statistics (as one process would)


@dataclass
class PruneConfig:
    """Finding a sparse ticket at initialisation (``robustsparse prune``); see robustsparse/prune/."""
    method: str = "magnitude"  # random | magnitude | snip | grasp | synflow | ntt | awt
    density: float = 0.1  # kept fraction of prunable weights (conv/linear weights)
    scope: typing.Optional[str] = None  # global | layer; None: the method's default (layer for ntt and for the
    #                                      faithful awt, else global)
    min_layer_density: float = 0.01  # layer-collapse guard; every layer also always keeps >= 1 weight
    structure: str = "unstructured"  # unstructured | channel (whole filters) | N:M, e.g. "2:4" (sparse/structured.py)
    samples: typing.Optional[int] = None  # data-driven scores (snip, grasp): images used; None: 10 x classes
    synflow_rounds: int = 100
    seed: int = 0
    # NTT / AWT search (method-notes §4(b).2-3). `preset` names the defaults of the keys marked "preset" (None:
    # the preset's value for prune.method; prune/presets.py has the tables): short (default; measured on digits to
    # cost well under 10% of the PGD-AT that follows; the mask never moves) | faithful (the method as specified:
    # layer-wise magnitude start, NTT's batch 64, Adam 5e-4, lambda_ker 1e-3, mask recomputed every 100 of 1100
    # iterations). An explicit key overrides its preset value.
    preset: str = "short"
    search_iters: typing.Optional[int] = None  # preset: optimisation steps (short 20, faithful 1100)
    search_batch: typing.Optional[int] = None  # preset: images per step, split in two halves for the NTK pair
    #                                             (x1, x2) (short 4, faithful 64 as NTT)
    search_lr: typing.Optional[float] = None  # preset: Adam (short 5e-3, ~100x shorter than NTT; faithful 5e-4)
    ntk_weight: typing.Optional[float] = None  # preset: lambda_ker (short 0.1: NTT's 1e-3 is too weak for a short
    #                                            search; faithful 1e-3)
    output_weight: float = 1.0
    l2_weight: float = 1e-5  # lambda_L2 (divided by density, as in NTT)
    mask_update_every: int = 100  # magnitude mask update period (iterations; NTT: 100). The short search is
    #                                 shorter, so the initial mask is kept (measured: better at density 0.1)
    points: str = "adversarial"  # awt: adversarial | clean | both (ntt is always clean)
    attack_target: str = "dense"  # awt: PGD against the dense init ("dense") or the current sparse student
    mode: str = "weights"  # awt: weights (NTT-faithful, weights move) | mask_only (scores + top-k + STE at theta_0)
    ntk_mode: str = "full"  # full [n1, n2, K, K] (NTT) | trace [n1, n2] | projected (random output projection)
    init_method: typing.Optional[str] = None  # ntt/awt, preset: scorer whose mask starts the search (short: ntt
    #                                            magnitude, awt synflow, measured on digits; faithful: magnitude)
    allocation: typing.Optional[str] = None  # ntt/awt mask updates, preset: fixed (per-layer counts of the initial
    #                                          mask; short) | rescope (re-rank in prune.scope; faithful)
    ticket_weights: str = "searched"  # ntt/awt ticket starts from m*theta_s ("searched", NTT) or m*theta_0 ("init")
    bn_stats: str = "init"  # ntt/awt: BN statistics of the search's eval-mode passes: init (0, 1) | batch (those
    #                          of the first bn_samples training images, recomputed for the student every step)
    bn_samples: int = 256
    rescale: str = "none"  # ntt/awt ticket weights: none | filter (BN-fed conv filters get their m*theta_0 norm
    #                         back) | dense (rows rescaled towards the dense kernel under batch BN); prune/rescale.py
    checkpoint_every: int = 10  # ntt/awt: save the resumable search state every N iterations (0: never)
    # After-training pruning (`robustsparse posttrain`, robustsparse/posttrain/). Defaults sized for digits, whose
    # dense PGD-AT is 30 epochs of 19 steps. HYDRA's CIFAR recipe is 20 score + 100 fine-tune epochs after 100
    # pre-training epochs of ~390 steps. Scaled down: 10 score epochs (190 steps; measured on digits at density
    # 0.1, the mask moves ~21% away from LWM and the masked net's val robust accuracy levels off by epoch ~8) and
    # 10 fine-tune epochs, each a third of pre-training.
    hydra_epochs: int = 10  # score-stage epochs (HYDRA: 20)
    hydra_lr: float = 0.1  # SGD on the scores, cosine (HYDRA's configs.yml: 0.1)
    hydra_weight_decay: float = 1e-4  # on the scores (and BN when trainable), as HYDRA's optimizer
    hydra_objective: str = "trades"  # trades (HYDRA's `adv` trainer, beta = train.trades_beta) | pgd_at
    freeze_bn: bool = False  # score stage: BN affine parameters frozen too (HYDRA --freeze-bn)
    hydra_pre_forward: bool = True  # score stage: a train-mode forward of the clean batch before the TRADES/PGD
    #                                  loss (HYDRA's trainer/adv.py), so the eval-mode attack sees BN running
    #                                  statistics already updated with the batch; False skips it
    keep_count: str = "reference"  # kept weights per SynFlow round (global) / HYDRA layer: reference
    #                                 (n - int((1 - d) * n), as Synaptic-Flow and HYDRA) | round (round(d * n))
    finetune_epochs: int = 10  # hydra/lwm: fine-tune epochs of the kept weights (HYDRA: 100 = its pre-training)
    finetune_lr: float = 0.01  # hydra/lwm fine-tune LR (HYDRA: 0.01), with train.schedule
    imp_rate: float = 0.2  # IMP: fraction of the REMAINING weights pruned per round (LTH: 0.2)
    imp_rewind_epoch: int = 0  # IMP: rewind to initialisation (0) or to the dense run's weights after epoch k
    imp_epochs: typing.Optional[int] = None  # IMP: PGD-AT epochs per round (None: train.epochs)
    imp_eval_suite: str = "clean,pgd-20"  # IMP: attacks run on every round's ticket (logged in rounds.jsonl)


@dataclass
class OfaConfig:
    """Once-for-all training (train.method = oat | float | smart; robustsparse/ofa/, method-notes §3, §5.1-5.2)."""
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 1.0])  # OAT's training λ set
    encoding: str = "rand"  # OAT λ encoding: rand (random orthogonal rows, OAT's default) | scalar (λ itself)
    encoding_dim: int = 128  # OAT rand encoding size (OAT --dim)
    film_at: str = "auto"  # OAT FiLM sites: bn (after every BN but the shortcuts', OAT's code) | conv (after every
    #                        conv, where a BN would be) | auto (bn if the model has BN, else conv) [INFERRED]
    noise_init: float = 0.25  # FLOAT: initial per-layer noise scale α
    density_clean: float = 0.5  # SMART: kept fraction of each split layer for the clean expert (d_c)
    density_adv: float = 0.5  # SMART: ... for the adversarial expert (d_a)
    overlap: str = "complementary"  # SMART masks: complementary (disjoint) | nested | independent | alternating
    # (disjoint, a fair draft; the split for score-ranked sources such as awt on a BN-free net: ofa/smart_masks.py)
    split_from: int = 0  # SMART: split conv/linear layers from this index on (0: all; the classifier is shared)
    mask_source: str = "random"  # SMART: random | magnitude | learned (scores, top-k, STE) | awt (NTT/AWT tickets)
    mix: str = "logit"  # SMART λ at inference: logit (mix the experts' softmaxes; the measured best, docs/results/
    #                     smart_digits.md) | weight (W*((1-λ)Mc+λMa), BN_a from λ=0.1) | switch (expert nearest λ)


@dataclass
class EvalConfig:
    suite: str = "clean,pgd-20,autoattack"
    eps: typing.Optional[float] = None  # None: the training eps
    split: str = "test"
    n: typing.Optional[int] = None  # evaluate the first n images of the split (None: all)
    autoattack_n: typing.Optional[int] = None  # AutoAttack (and its components) on the first autoattack_n of those
    #                                            points only, the other attacks on all (None: the same points);
    #                                            the Fashion-MNIST protocol: 1000 of 10,000, as Croce et al.
    batch_size: int = 500


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    ofa: OfaConfig = field(default_factory=OfaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def train_alpha(self) -> float:
        a = self.attack
        return a.alpha if a.alpha is not None else 2.5 * a.eps / a.steps

    def validate(self) -> "RunConfig":
        """Check every section (one function each, in this order: the first problem found is the one reported)."""
        _validate_training(self)
        _validate_data_and_eval(self)
        _validate_prune_at_init(self)
        _validate_prune_after_training(self)
        from .eval.evaluator import parse_suite
        parse_suite(self.eval.suite)
        parse_suite(self.prune.imp_eval_suite)
        _validate_ofa(self)
        return self


def _validate_training(cfg: RunConfig) -> None:
    """train.* and attack.*: choices, ranges and the attacks each method needs."""
    a, t, e = cfg.attack, cfg.train, cfg.eval
    _choice("train.method", t.method, ("standard", "pgd_at", "trades", "fgsm_at", "oat", "float", "smart"))
    _choice("train.on_overfit", t.on_overfit, ("warn", "stop"))
    _range("train.overfit_drop", t.overfit_drop, lo=0.0, lo_open=True, hi=1.0)
    _range("train.max_loss_factor", t.max_loss_factor, lo=0.0)
    _choice("train.schedule", t.schedule, ("cosine", "onecycle", "multistep", "constant"))
    _choice("attack.norm", a.norm, ("Linf", "L2"))
    _choice("eval.split", e.split, ("train", "val", "test", "trainval"))
    if t.method == "trades" and a.norm != "Linf":
        raise UserError("train.method=trades uses an L∞ KL attack; set attack.norm=Linf")
    if t.method == "fgsm_at" and a.norm != "Linf":
        raise UserError("train.method=fgsm_at is FGSM, an L∞ attack; set attack.norm=Linf")
    _range("attack.eps", a.eps, lo=0.0, lo_open=True, hi=None if a.norm == "L2" else 1.0)
    _range("attack.steps", a.steps, lo=1)
    if a.alpha is not None:
        _range("attack.alpha", a.alpha, lo=0.0, lo_open=True)
    _range("train.epochs", t.epochs, lo=1)
    _range("train.batch_size", t.batch_size, lo=2)
    _range("train.lr", t.lr, lo=0.0, lo_open=True)
    _range("train.momentum", t.momentum, lo=0.0, hi=1.0, hi_open=True)
    _range("train.weight_decay", t.weight_decay, lo=0.0)
    _range("train.trades_beta", t.trades_beta, lo=0.0)
    if t.trades_forwards not in (2, 3):
        raise UserError(f"train.trades_forwards must be 2 or 3 (train-mode forwards per TRADES step); "
                        f"got {t.trades_forwards!r}")
    _range("train.warmup_epochs", t.warmup_epochs, lo=0.0, hi=float(t.epochs))
    _range("train.val_every", t.val_every, lo=1)
    _range("train.val_attack_steps", t.val_attack_steps, lo=1)
    _range("train.checkpoint_every_steps", t.checkpoint_every_steps, lo=0)
    _range("train.probe_every", t.probe_every, lo=0)
    for k in t.keep_epochs:
        _range("train.keep_epochs[]", k, lo=1, hi=t.epochs)
    for m in t.milestones:
        _range("train.milestones[]", m, lo=0.0, hi=1.0)


def _validate_data_and_eval(cfg: RunConfig) -> None:
    """data.*, eval.*, model.mean/std, train.device and train.amp."""
    t, e, d = cfg.train, cfg.eval, cfg.data
    _range("data.crop_padding", d.crop_padding, lo=0)
    if d.val_size is not None:
        _range("data.val_size", d.val_size, lo=0)
    if e.eps is not None:
        _range("eval.eps", e.eps, lo=0.0, lo_open=True)
    if e.n is not None:
        _range("eval.n", e.n, lo=1)
    if e.autoattack_n is not None:
        _range("eval.autoattack_n", e.autoattack_n, lo=1, hi=e.n)
    _range("eval.batch_size", e.batch_size, lo=1)
    if (cfg.model.mean is None) != (cfg.model.std is None):
        raise UserError("model.mean and model.std must be given together (or neither)")
    if t.device != "auto" and not (t.device == "cpu" or t.device.startswith("cuda")):
        raise UserError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _choice("train.amp", t.amp, ("auto", "bf16", "fp16", "fp32"))


def _validate_prune_at_init(cfg: RunConfig) -> None:
    """prune.*: the method, density and structure, and the at-init scorers and search."""
    p = cfg.prune
    _choice("prune.method", p.method, ("random", "magnitude", "snip", "grasp", "synflow", "ntt", "awt",
                                       "hydra", "lwm", "imp"))
    _range("prune.density", p.density, lo=0.0, lo_open=True, hi=1.0)
    if p.scope is not None:
        _choice("prune.scope", p.scope, ("global", "layer"))
    _range("prune.min_layer_density", p.min_layer_density, lo=0.0, hi=p.density)
    from .sparse.structured import parse_structure
    try:
        kind, n_keep, m_group = parse_structure(p.structure)
    except UserError as exc:
        raise UserError(f"prune.{exc}") from None
    if kind != "unstructured" and p.method in ("hydra", "lwm", "imp"):
        raise UserError(f"prune.structure={p.structure} is honoured by the at-init pruners only (random, "
                        f"magnitude, snip, grasp, synflow, ntt, awt), not by prune.method={p.method}")
    if kind == "nm" and abs(p.density - n_keep / m_group) > 1e-9:
        raise UserError(f"prune.structure={p.structure} keeps exactly {n_keep}/{m_group} of the weights; set "
                        f"prune.density={n_keep / m_group:g}")
    if p.samples is not None:
        _range("prune.samples", p.samples, lo=1)
    _range("prune.synflow_rounds", p.synflow_rounds, lo=1)
    _choice("prune.preset", p.preset, SEARCH_PRESETS)
    for key, lo in (("search_iters", 0), ("search_batch", 2), ("search_lr", 0.0), ("ntk_weight", 0.0),
                    ("output_weight", 0.0), ("l2_weight", 0.0)):
        if getattr(p, key) is not None:  # None: the preset's value
            _range(f"prune.{key}", getattr(p, key), lo=lo)
    _range("prune.mask_update_every", p.mask_update_every, lo=1)
    _choice("prune.points", p.points, ("adversarial", "clean", "both"))
    _choice("prune.attack_target", p.attack_target, ("dense", "student"))
    _choice("prune.bn_stats", p.bn_stats, ("init", "batch"))
    _range("prune.bn_samples", p.bn_samples, lo=2)  # batch statistics need two images
    _choice("prune.rescale", p.rescale, ("none", "filter", "dense"))
    _choice("prune.mode", p.mode, ("weights", "mask_only"))
    _choice("prune.ntk_mode", p.ntk_mode, ("full", "trace", "projected"))
    if p.init_method is not None:
        _choice("prune.init_method", p.init_method, ("random", "magnitude", "snip", "grasp", "synflow"))
    if p.allocation is not None:
        _choice("prune.allocation", p.allocation, ("fixed", "rescope"))
    _choice("prune.ticket_weights", p.ticket_weights, ("searched", "init"))
    _range("prune.checkpoint_every", p.checkpoint_every, lo=0)


def _validate_prune_after_training(cfg: RunConfig) -> None:
    """prune.*: HYDRA, the fine-tune and IMP."""
    a, p = cfg.attack, cfg.prune
    _range("prune.hydra_epochs", p.hydra_epochs, lo=1)
    _range("prune.hydra_lr", p.hydra_lr, lo=0.0, lo_open=True)
    _range("prune.hydra_weight_decay", p.hydra_weight_decay, lo=0.0)
    _choice("prune.hydra_objective", p.hydra_objective, ("trades", "pgd_at"))
    _choice("prune.keep_count", p.keep_count, ("reference", "round"))
    if p.method == "hydra" and p.hydra_objective == "trades" and a.norm != "Linf":
        raise UserError("prune.hydra_objective=trades uses an L∞ KL attack; set attack.norm=Linf or "
                        "prune.hydra_objective=pgd_at")
    _range("prune.finetune_epochs", p.finetune_epochs, lo=1)
    _range("prune.finetune_lr", p.finetune_lr, lo=0.0, lo_open=True)
    _range("prune.imp_rate", p.imp_rate, lo=0.0, lo_open=True, hi=1.0, hi_open=True)
    _range("prune.imp_rewind_epoch", p.imp_rewind_epoch, lo=0)  # < the dense run's epochs: posttrain checks
    if p.imp_epochs is not None:
        _range("prune.imp_epochs", p.imp_epochs, lo=1)


# PyYAML raises these beside YAMLError for malformed explicit tags (e.g. "!!int x", "!!timestamp x")
_YAML_ERRORS = (yaml.YAMLError, ValueError, KeyError, AttributeError, IndexError, TypeError, OverflowError)


def _validate_ofa(cfg: "RunConfig") -> None:
    o, t = cfg.ofa, cfg.train
    if not o.lambdas or len(set(o.lambdas)) != len(o.lambdas):
        raise UserError(f"ofa.lambdas must be a non-empty list of distinct values in [0, 1], got {o.lambdas!r}")
    for lam in o.lambdas:
        _range("ofa.lambdas[]", lam, lo=0.0, hi=1.0)
    _choice("ofa.encoding", o.encoding, ("rand", "scalar"))
    _range("ofa.encoding_dim", o.encoding_dim, lo=len(o.lambdas))
    _range("ofa.noise_init", o.noise_init, lo=0.0)
    _range("ofa.density_clean", o.density_clean, lo=0.0, lo_open=True, hi=1.0)
    _range("ofa.density_adv", o.density_adv, lo=0.0, lo_open=True, hi=1.0)
    _choice("ofa.overlap", o.overlap, ("complementary", "nested", "independent", "alternating"))
    if o.overlap == "alternating" and o.mask_source == "learned":
        raise UserError("ofa.overlap=alternating cannot re-draft learned masks in every forward pass (100 rounds a "
                        "layer); use ofa.overlap=complementary with ofa.mask_source=learned")
    if o.overlap in ("complementary", "alternating") and o.density_clean + o.density_adv > 1 + 1e-9:
        raise UserError(f"ofa.overlap={o.overlap} needs ofa.density_clean + ofa.density_adv <= 1 (disjoint masks), "
                        f"got {o.density_clean} + {o.density_adv}; lower a density or use overlap=independent")
    _range("ofa.split_from", o.split_from, lo=0)
    _choice("ofa.mask_source", o.mask_source, ("random", "magnitude", "learned", "awt"))
    _choice("ofa.film_at", o.film_at, ("auto", "bn", "conv"))
    _choice("ofa.mix", o.mix, ("switch", "weight", "logit"))
    if t.method in ("oat", "float", "smart"):
        if t.ticket is not None:
            raise UserError(f"train.method={t.method} builds its own conditional model; train.ticket is for "
                            "pgd_at/trades/standard (SMART takes AWT tickets via ofa.mask_source=awt)")
        if t.batch_size < 4:
            raise UserError(f"train.method={t.method} splits every batch; train.batch_size must be >= 4")


def _choice(key, value, allowed):
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _range(key, value, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number; got {value!r}")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_txt = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
        raise UserError(f"{key} must be {' and '.join(t for t in (lo_txt, hi_txt) if t)}; got {value!r}")


def _check_type(key: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string; accept what every user means by it
            return float(value)
        except ValueError:
            pass
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    base = origin or annotation
    if base is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise UserError(f"{key} must be of type {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data, prefix=""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'the config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key {full!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, annotation)
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers, so ``prune.structure=2:4`` stays the string "2:4"
    (``yaml.safe_load("2:4")`` is 124)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not (tag == "tag:yaml.org,2002:int" and rx.match("2:4"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.epochs=5", "model.options={width: 32}"]`` → nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except _YAML_ERRORS as exc:
            raise UserError(f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"override {item!r} has an empty key part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shipped_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("robustsparse.configs").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path, or the name of a config shipped with the library (``robustsparse configs`` lists them)."""
    if os.path.exists(name_or_path):
        return name_or_path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    shipped = resources.files("robustsparse.configs") / f"{stem}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(f"config {name_or_path!r} is neither a file nor a shipped config "
                    f"(shipped: {', '.join(shipped_configs())})")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        real = resolve_config_path(path)
        try:
            with open(real) as fh:
                data = yaml.load(fh, Loader=_Loader) or {}
        except UnicodeDecodeError as exc:
            raise UserError(f"config {path} is not a text (UTF-8) file") from exc
        except _YAML_ERRORS as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, whatever the error
            raise UserError(f"config {path} is not valid YAML{where}: {problem}") from exc
        except OSError as exc:
            raise UserError(f"cannot read config {path}: {exc.strerror}") from exc
        if not isinstance(data, dict):
            raise UserError(f"config {path} must be a YAML mapping (section: {{key: value}}), got {data!r}")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return _build(RunConfig, data).validate()


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data).validate()


def parse_model_options(items) -> dict:
    """``--model-option KEY=VALUE`` items (values parsed as YAML) -> build_model options."""
    options = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--model-option {item!r} must look like KEY=VALUE (e.g. width=64)")
        key, raw = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--model-option {item!r}: the value is not valid YAML") from exc
    return options
