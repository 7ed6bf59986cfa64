"""The papers' key experiments, one entry each, with the published numbers they should reproduce.

Every variant is an ordinary ``tasks.classify fit`` of a config with a backbone (and builder options):
the runner launches them, the report compares them with the paper. Numbers are test error in percent
(ImageNet: top-1 validation error), transcribed in ``../shared/PAPERS.md``; ``params_m`` is each
variant's size (millions, with the dataset's classifier), checked by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Variant:
    """One network of a study."""

    name: str
    backbone: str
    backbone_args: dict = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)  # e.g. {"error": 6.61}
    params_m: float | None = None  # documented size, millions of parameters
    gmacs: float | None = None  # documented complexity, where the paper gives it


@dataclass(frozen=True)
class Study:
    """An experiment: which paper table/figure, the base config, and its variants."""

    name: str
    paper: str
    where: str
    question: str
    config: str
    variants: tuple[Variant, ...]
    metric: str = "val/acc1"  # error = 100 x (1 - metric)
    notes: str = ""

    @property
    def config_path(self) -> Path:
        return CONFIGS / self.config


RESNET = "He et al. 2015, Deep Residual Learning (arXiv 1512.03385)"
IDENTITY = "He et al. 2016, Identity Mappings in Deep Residual Networks (arXiv 1603.05027)"
RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations (arXiv 1611.05431)"

_CIFAR_SIZES = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}
_CIFAR_ERRORS = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97}

STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study(
            name="degradation_cifar",
            paper=RESNET,
            where="Sec. 4.2, Fig. 6; Table 6",
            question="Do deeper plain nets train worse (degradation) while residual twins get better with depth?",
            config="cifar10_plain56.yaml",
            variants=tuple(
                [Variant(f"plain{d}", f"cifar_plain{d}", params_m=_CIFAR_SIZES[d]) for d in (20, 32, 44, 56)]
                + [
                    Variant(
                        f"resnet{d}",
                        f"cifar_resnet{d}",
                        published={"error": _CIFAR_ERRORS[d]},
                        params_m=_CIFAR_SIZES[d],
                    )
                    for d in (20, 32, 44, 56)
                ]
            ),
            notes="Fig. 6 (left): plain-56 has higher training and test error than plain-20; the paper plots "
            "curves without tabulating the plain nets' errors.",
        ),
        Study(
            name="degradation_imagenet",
            paper=RESNET,
            where="Sec. 4.1, Fig. 4, Table 2",
            question="Plain-34 is worse than plain-18; ResNet-34 is better than ResNet-18.",
            config="imagenet_resnet34.yaml",
            variants=(
                Variant("plain18", "plain18", published={"error": 27.94}, params_m=11.52, gmacs=1.8),
                Variant("plain34", "plain34", published={"error": 28.54}, params_m=21.62, gmacs=3.64),
                Variant(
                    "resnet18", "resnet18", {"shortcut": "A"}, published={"error": 27.88}, params_m=11.52, gmacs=1.8
                ),
                Variant(
                    "resnet34", "resnet34", {"shortcut": "A"}, published={"error": 25.03}, params_m=21.62, gmacs=3.64
                ),
            ),
            notes="Table 2 reports 10-crop top-1 error; the ResNets use option A (zero-padding) shortcuts. Table 1's "
            "3.6 GFLOPs for the 34-layer nets measure 3.64 GMACs here.",
        ),
        Study(
            name="shortcuts_imagenet",
            paper=RESNET,
            where="Sec. 4.1, Table 3",
            question="Identity (A), projections where dimensions grow (B), or projections everywhere (C)?",
            config="imagenet_resnet34.yaml",
            variants=(
                Variant("A", "resnet34", {"shortcut": "A"}, published={"error": 25.03, "top5": 7.76}, params_m=21.62),
                Variant("B", "resnet34", {"shortcut": "B"}, published={"error": 24.52, "top5": 7.46}, params_m=21.80),
                Variant("C", "resnet34", {"shortcut": "C"}, published={"error": 24.19, "top5": 7.40}, params_m=22.72),
            ),
            notes="10-crop top-1/top-5 error.",
        ),
        Study(
            name="skip_connections",
            paper=IDENTITY,
            where="Sec. 3.1, Fig. 2, Table 1",
            question="Does anything on the shortcut (scaling, gating, 1x1 conv, dropout) beat the identity?",
            config="cifar10_resnet110.yaml",
            variants=(
                Variant("identity", "cifar_resnet110", published={"error": 6.61}, params_m=1.73),
                Variant(
                    "scale_0.5",
                    "cifar_resnet110",
                    {"skip": "scale", "skip_param": 0.5},
                    published={"error": float("nan")},
                    params_m=1.73,
                ),  # fails (> 20%)
                Variant(
                    "scale_both_0.5",
                    "cifar_resnet110",
                    {"skip": "scale_both", "skip_param": 0.5},
                    published={"error": 12.35},
                    params_m=1.73,
                ),
                Variant(
                    "exclusive_gate",
                    "cifar_resnet110",
                    {"skip": "exclusive_gate", "skip_param": -6},
                    published={"error": 8.70},
                    params_m=1.82,
                ),
                Variant(
                    "exclusive_gate_b0",
                    "cifar_resnet110",
                    {"skip": "exclusive_gate", "skip_param": 0},
                    published={"error": float("nan")},
                    params_m=1.82,
                ),  # fails for every b_g init from 0 to -5
                Variant(
                    "exclusive_gate_b-7",
                    "cifar_resnet110",
                    {"skip": "exclusive_gate", "skip_param": -7},
                    published={"error": 9.81},
                    params_m=1.82,
                ),
                Variant(
                    "shortcut_gate_b0",
                    "cifar_resnet110",
                    {"skip": "shortcut_gate", "skip_param": 0},
                    published={"error": 12.86},
                    params_m=1.82,
                ),
                Variant(
                    "shortcut_gate",
                    "cifar_resnet110",
                    {"skip": "shortcut_gate", "skip_param": -6},
                    published={"error": 6.91},
                    params_m=1.82,
                ),
                Variant("conv_1x1", "cifar_resnet110", {"skip": "conv"}, published={"error": 12.22}, params_m=1.83),
                Variant(
                    "dropout_0.5",
                    "cifar_resnet110",
                    {"skip": "dropout", "skip_param": 0.5},
                    published={"error": float("nan")},
                    params_m=1.73,
                ),  # fails
            ),  # fmt: skip
            notes="NaN: the paper reports the run failing (test error > 20%).",
        ),
        Study(
            name="activation_placement",
            paper=IDENTITY,
            where="Sec. 4, Fig. 4, Table 2",
            question="Where should BN and ReLU go: after the addition, before it, or before the weights?",
            config="cifar10_resnet110.yaml",
            variants=tuple(
                Variant(
                    f"{unit}_{depth}",
                    f"cifar_resnet{depth}",
                    {"unit": unit},  # 110: option A, as in the ResNet paper's CIFAR recipe; 164: projections (B)
                    published={"error": err},
                    params_m=size,
                )
                for depth, size, errors in (
                    (110, 1.73, (6.61, 8.17, 7.84, 6.71, 6.37)),
                    (164, 1.70, (5.93, 6.50, 6.14, 5.91, 5.46)),
                )
                for unit, err in zip(
                    ("original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact"), errors
                )
            ),  # fmt: skip
        ),
        Study(
            name="depth_preact",
            paper=IDENTITY,
            where="Sec. 4.2, Table 3",
            question="Does pre-activation let 1001 layers beat 164 (where original units overfit/fail to)?",
            config="cifar10_preact_resnet164.yaml",
            variants=(
                Variant("original_164", "cifar_resnet164", published={"error": 5.93}, params_m=1.7),
                Variant("preact_164", "cifar_preact_resnet164", published={"error": 5.46}, params_m=1.7),
                Variant("original_1001", "cifar_resnet1001", published={"error": 7.61}, params_m=10.33),
                Variant("preact_1001", "cifar_preact_resnet1001", published={"error": 4.92}, params_m=10.33),
            ),
            notes="CIFAR-10; for CIFAR-100 run with configs/cifar100_preact_resnet164.yaml (--config): "
            "Table 3 gives 25.16 / 24.33 (164) and 27.82 / 22.71 (1001). Table 3 rounds the 1001-layer nets to "
            "10.2M parameters; built here they have 10.33M.",
        ),
        Study(
            name="cardinality",
            paper=RESNEXT,
            where="Sec. 5.1, Tables 2 and 3",
            question="At equal complexity, is more cardinality better than more width?",
            config="imagenet_resnext50_32x4d.yaml",
            variants=tuple(
                Variant(
                    f"{c}x{d}d",
                    "resnet50",
                    {"groups": c, "width_per_group": d},
                    published={"error": err},
                    params_m=params,
                    gmacs=gmacs,
                )
                for c, d, err, params, gmacs in (
                    (1, 64, 23.9, 25.56, 4.09),
                    (2, 40, 23.0, 25.43, 4.12),
                    (4, 24, 22.6, 25.29, 4.16),
                    (8, 14, 22.3, 25.60, 4.27),
                    (32, 4, 22.2, 25.03, 4.23),
                )
            ),  # fmt: skip
            notes="Single 224 crop top-1 error. Table 2 rounds every variant to ~25M parameters and ~4.1 GFLOPs; "
            "built here (torchvision's stride in the 3x3) they measure 25.0-25.6M and 4.09-4.27 GMACs.",
        ),
    ]
}
