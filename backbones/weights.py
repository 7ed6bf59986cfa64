"""Loading weights into backbones: torchvision names, URLs and local files, never executing pickles.

``load_weights(net, source)`` accepts

* a torchvision weights name, ``"ResNet50_Weights.IMAGENET1K_V2"`` (or, for a net that torchvision also
  has, the short ``"IMAGENET1K_V2"`` / ``"DEFAULT"``), downloaded to the torch hub cache when online;
* an ``http(s)://`` URL of a state dict;
* a local ``.pth``/``.pt``/``.bin`` state dict, a ``.ckpt`` written by this project's tasks (Lightning),
  or a ``.safetensors`` file.

Every pickle-based file is read with ``torch.load(..., weights_only=True)``: a file holding arbitrary
Python objects is refused with a clear error instead of being executed. Keys are remapped from timm's
pre-activation ``resnetv2_*`` layout; torchvision's ResNet/ResNeXt (and timm's v1 ``resnet*``) keys are
already ours. A load is all or nothing: missing, unexpected or mis-shaped keys raise
:class:`WeightsError` listing them.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from zoo_common.checkpoints import WeightsError, backbone_state, task_checkpoint, torch_load_safe

from .blocks import PREACT_UNITS

log = logging.getLogger(__name__)

#: Zoo names whose architecture torchvision publishes weights for, and that enum's class name.
TORCHVISION_WEIGHTS: dict[str, str] = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
    "resnext101_64x4d": "ResNeXt101_64X4D_Weights",
}

#: Builder options that do not change what a weight file means: how the net is normalized, dilated,
#: initialized or cut, not which function its weights compute.
_NOT_ARCHITECTURE = ("norm", "output_stride", "zero_init_residual", "num_classes", "out_features")

_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    source: str
    loaded: int
    dropped: list[str] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------------
def _download(url: str, what: str, check_hash: bool = False) -> dict[str, Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=check_hash, weights_only=True
        )
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{what}: refused to load {url}: not a plain state dict ({err})") from None
    except Exception as err:  # network errors come in many types (URLError, HTTPError, socket errors)
        raise WeightsError(
            f"{what}: could not download {url} ({type(err).__name__}: {err}). Without internet access, "
            f"fetch the file elsewhere and pass its local path instead."
        ) from None


def torchvision_weights(source: str, net_name: str | None = None):
    """Resolve a torchvision weights name to its enum member, or return ``None`` if it is not one.

    Accepts ``"ResNet50_Weights.IMAGENET1K_V2"`` and, when ``net_name`` is a zoo name torchvision also
    has, ``"IMAGENET1K_V2"`` or ``"DEFAULT"``.
    """
    from torchvision.models import get_weight

    if "." not in source and net_name in TORCHVISION_WEIGHTS and re.fullmatch(r"[A-Z0-9_]+", source):
        source = f"{TORCHVISION_WEIGHTS[net_name]}.{source}"
    if not re.fullmatch(r"[A-Za-z0-9_]+_Weights\.[A-Z0-9_]+", source):
        return None
    try:
        return get_weight(source)
    except (ValueError, KeyError, AttributeError):
        enum_name = source.split(".")[0]
        known = [f"{enum}.<NAME>" for enum in TORCHVISION_WEIGHTS.values()]
        raise WeightsError(
            f"weights={source!r} is not a torchvision weights name. Known enums for this zoo: "
            f"{', '.join(known)} (e.g. ResNet50_Weights.IMAGENET1K_V2); '{enum_name}' has no such member "
            f"or does not exist."
        ) from None


def check_weights_fit(enum, net_name: str | None) -> None:
    """Refuse, before downloading anything, torchvision backbone weights of another architecture than
    ``net_name`` (a config's ``weights_backbone`` left behind when ``--model.backbone`` swapped the net)."""
    kind = type(enum).__name__
    if net_name is None or kind not in TORCHVISION_WEIGHTS.values() or TORCHVISION_WEIGHTS.get(net_name) == kind:
        return
    owner = next(name for name, enum_name in TORCHVISION_WEIGHTS.items() if enum_name == kind)
    fitting = (
        f"{TORCHVISION_WEIGHTS[net_name]}.DEFAULT (torchvision's {net_name} weights)"
        if net_name in TORCHVISION_WEIGHTS
        else f"a weights file for {net_name} (torchvision publishes none for it)"
    )
    raise WeightsError(
        f"weights='{kind}.{enum.name}' are torchvision's {owner} weights and do not fit {net_name}. Pass {fitting}, "
        f"or null to start from scratch (e.g. --model.weights_backbone null)."
    )


def read_state_dict(source: str | Path, net_name: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Read ``source`` into a flat ``{key: tensor}`` dict; also return metadata about where it came from.

    The metadata holds what the source records: ``checkpoint_backbone`` (the zoo name in a task
    checkpoint or an exported file), ``architecture`` (its builder options, see :func:`check_architecture`),
    ``backbone_keys`` (where a task checkpoint keeps the backbone, see :func:`zoo_common.checkpoints.backbone_state`),
    ``class_names`` and ``category_ids`` (a task's label set), ``categories`` (torchvision's class names).
    """
    what = f"weights={str(source)!r}"
    meta: dict = {}
    text = str(source)
    enum = None if isinstance(source, Path) else torchvision_weights(text, net_name)
    if enum is not None:
        check_weights_fit(enum, net_name)
        meta["categories"] = enum.meta.get("categories")
        raw: object = _download(enum.url, what, check_hash=True)  # file names carry the hash
    elif re.match(r"https?://", text):
        raw = _download(text, what)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            if net_name is not None and re.fullmatch(r"[A-Z0-9_]+", text):  # a member name, e.g. IMAGENET1K_V1
                raise WeightsError(
                    f"{what}: torchvision publishes no weights for {net_name}, so there is no {text} of it. Pass a "
                    f"weights file (a tasks.classify checkpoint of {net_name}, say) or null to start from scratch."
                )
            hint = ""
            if net_name in TORCHVISION_WEIGHTS:
                hint = f" or a torchvision name such as {TORCHVISION_WEIGHTS[net_name]}.DEFAULT"
            raise WeightsError(
                f"{what}: no such file, URL or torchvision weights name. Pass a .pth/.ckpt/.safetensors path{hint}."
            )
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                raw = load_file(str(path), device="cpu")
                meta.update(safetensors_metadata(path))
            except (SafetensorError, OSError, ValueError) as err:
                raise WeightsError(f"{what}: not a readable safetensors file ({err})") from None
        else:
            raw = torch_load_safe(path, what)
    state = _unwrap(raw, what, meta)
    if is_timm_resnetv2(state):  # timm's first unit keeps its activation off the shortcut
        meta.setdefault("architecture", {})["shared_first_activation"] = False
    return state, meta


def _unwrap(raw: object, what: str, meta: dict) -> dict[str, Tensor]:
    """Find the state dict inside a task checkpoint (``zoo_common.checkpoints``), a training checkpoint or a
    bare state dict; a task checkpoint's backbone name, label set and backbone record go into ``meta``."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{what}: expected a state dict (a mapping of names to tensors), got {type(raw).__name__}")
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):  # Lightning (or timm train) checkpoint
        checkpoint = task_checkpoint({"hyper_parameters": {}, **raw}, Path(what))
        if isinstance(checkpoint.hyper_parameters.get("backbone"), str):
            meta["checkpoint_backbone"] = checkpoint.hyper_parameters["backbone"]
        if checkpoint.class_names:
            meta["class_names"] = checkpoint.class_names
        if checkpoint.category_ids:
            meta["category_ids"] = checkpoint.category_ids
        if isinstance(checkpoint.backbone.get("architecture"), dict):
            meta["architecture"] = dict(checkpoint.backbone["architecture"])
        if isinstance(checkpoint.backbone.get("keys"), dict):
            meta["backbone_keys"] = dict(checkpoint.backbone["keys"])
        return checkpoint.state_dict
    if "model" in raw and isinstance(raw["model"], dict):  # torchvision reference-script checkpoint
        return raw["model"]
    bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{what}: entries {bad[:5]} are not tensors; this is not a state dict")
    return raw


# -- remapping ----------------------------------------------------------------------------------
def safetensors_metadata(path: Path) -> dict:
    """What :func:`save_weights` records in a ``.safetensors`` file: the zoo name and builder options."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    meta: dict = {}
    if header.get("backbone"):
        meta["checkpoint_backbone"] = header["backbone"]
    if header.get("architecture"):
        try:
            meta["architecture"] = json.loads(header["architecture"])
        except json.JSONDecodeError:
            pass
    return meta


#: Builder options that choose among the papers' variants of a named network (``ResNet``'s arguments):
#: the ones a weight file can record and a task can adopt from it.
VARIANT_OPTIONS: tuple[str, ...] = (
    "stride_in_1x1", "shortcut", "skip", "skip_param", "unit", "form", "shared_first_activation",
)  # fmt: skip


def _moot(option: str, architecture: dict) -> bool:
    """Options that change nothing in a network of ``architecture``: the 1x1 stride of basic units, where
    the first pre-activation goes in bottleneck or post-activation nets (their first unit projects, or
    has none)."""
    if option == "stride_in_1x1":
        return not architecture.get("bottleneck")
    if option == "shared_first_activation":
        return architecture.get("bottleneck", False) or architecture.get("unit") not in PREACT_UNITS
    return False


def adopt_architecture(given: dict, recorded: dict | None, default: dict) -> dict:
    """The variant options a weight file ``recorded`` that a network built with ``given`` options would
    not have (``default``: that network's ``architecture``), for the caller to build with.

    Options the caller set are never overridden (:func:`check_architecture` then refuses a conflict); the
    others follow the file, so ResNet-50 weights trained as the paper's v1 (``stride_in_1x1``) build v1.
    """
    if not recorded:
        return {}
    return {
        k: recorded[k]
        for k in VARIANT_OPTIONS
        if k in recorded and k not in given and recorded[k] != default.get(k) and not _moot(k, default)
    }  # fmt: skip


def check_architecture(recorded: dict | None, net: nn.Module, what: str) -> None:
    """Refuse weights recorded with other builder options than ``net`` was built with.

    Tensor names and shapes cannot tell ResNet-50 v1 (``stride_in_1x1``) from v1.5, nor other options
    apart that keep the shapes; loading one into the other runs a different network without a word. A
    task checkpoint and an exported ``.safetensors`` record the options; a bare state dict cannot tell and
    is accepted (torchvision's files are v1.5, ``stride_in_1x1=False``).
    """
    own = getattr(net, "architecture", None)
    if not recorded or not own:
        return
    differ = [
        key
        for key, value in recorded.items()
        if key in own and key not in _NOT_ARCHITECTURE and own[key] != value and not _moot(key, own)
    ]  # fmt: skip
    if differ:
        found = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
        built = ", ".join(f"{k}={own[k]!r}" for k in differ)
        fix = "{" + ", ".join(f"{k}: {recorded[k]!r}" for k in differ) + "}"
        raise WeightsError(
            f"{what} were trained with {found}, but this network is built with {built}: they would compute "
            f"another function. Build it with those options (backbone_args {fix}) or pass weights of this network."
        )


def is_timm_resnetv2(state: dict[str, Tensor]) -> bool:
    return "stem.conv.weight" in state and any(k.startswith("stages.0.blocks.0.") for k in state)


def remap_timm_resnetv2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ``resnetv2_*`` (pre-activation) keys to ours: ``stages.i.blocks.j.norm1`` -> ``layer{i+1}.j.bn1``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = None
        if m := re.match(r"^stem\.conv\.(.*)$", key):
            new = f"conv1.{m[1]}"
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(norm|conv)(\d)\.(.*)$", key):
            layer = "bn" if m[3] == "norm" else "conv"
            new = f"layer{int(m[1]) + 1}.{m[2]}.{layer}{m[4]}.{m[5]}"
        elif m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.(.*)$", key):
            new = f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}"
        elif m := re.match(r"^norm\.(.*)$", key):
            new = f"norm_final.{m[1]}"
        elif m := re.match(r"^head\.fc\.(.*)$", key):
            new = f"fc.{m[1]}"
            if value.ndim == 4:  # timm's classifier is a 1x1 convolution
                value = value.flatten(1)
        out[new or key] = value
    return out


def remap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Translate a foreign layout into the zoo's parameter names (torchvision's names are ours)."""
    if is_timm_resnetv2(state):
        return remap_timm_resnetv2(state)
    return dict(state)


# -- loading ------------------------------------------------------------------------------------
def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def _is_bookkeeping(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_state_dict_checked(net: nn.Module, state: dict[str, Tensor], what: str) -> int:
    """Load ``state`` into ``net``, all or nothing; raise :class:`WeightsError` listing any mismatch.

    BatchNorm's ``num_batches_tracked`` counters are bookkeeping, not weights, and may be absent on
    either side (frozen BN has none). Returns the number of tensors loaded.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state and not _is_bookkeeping(k)]
    unexpected = [k for k in state if k not in own and not _is_bookkeeping(k)]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        message = f"{what} does not fit {type(net).__name__}"
        if getattr(net, "name", None):
            message += f" '{net.name}'"
        if missing:
            message += _listing("missing in the file", missing)
        if unexpected:
            message += _listing("unexpected in the file", unexpected)
        if mis_shaped:
            message += _listing("shape mismatch", mis_shaped)
        raise WeightsError(message)
    usable = {k: v for k, v in state.items() if k in own}
    net.load_state_dict(usable, strict=False)
    return len(usable)


def apply_weights(
    net: nn.Module,
    state: dict[str, Tensor],
    *,
    what: str,
    ignore_head: bool = False,
    checkpoint_backbone: str | None = None,
    architecture: dict | None = None,
) -> LoadReport:
    """Load an already-read state dict into the backbone ``net`` (the second half of :func:`load_weights`).

    ``checkpoint_backbone`` and ``architecture`` are what the source records (its zoo name and builder
    options): a source of another network is refused before any tensor is compared.
    """
    net_name = getattr(net, "name", None)
    if checkpoint_backbone is not None and net_name is not None and checkpoint_backbone != net_name:
        raise WeightsError(
            f"{what} was trained with backbone '{checkpoint_backbone}', but this model is '{net_name}': build "
            f"'{checkpoint_backbone}' or pass a checkpoint of '{net_name}'."
        )
    check_architecture(architecture, net, what)
    state = remap(state)
    dropped: list[str] = []
    has_classifier = getattr(net, "fc", None) is not None
    if ignore_head or not has_classifier:
        dropped = [k for k in _CLASSIFIER_KEYS if k in state]
        state = {k: v for k, v in state.items() if k not in _CLASSIFIER_KEYS}
        if has_classifier:
            own = net.state_dict()
            state.update({k: own[k] for k in _CLASSIFIER_KEYS if k in own})
    loaded = load_state_dict_checked(net, state, what)
    if dropped:
        log.info("%s: classifier %s not loaded", what, ", ".join(dropped))
    return LoadReport(source=what, loaded=loaded, dropped=dropped)


def load_weights(net: nn.Module, source: str | Path, *, ignore_head: bool = False) -> LoadReport:
    """Load ``source`` into the backbone ``net`` (see the module docstring for accepted sources).

    Args:
        net: a zoo backbone (its ``name`` is checked against a task checkpoint's recorded backbone).
        source: torchvision weights name, URL or file path.
        ignore_head: drop the file's classifier (``fc``) and keep ``net``'s own, e.g. to fine-tune
            ImageNet weights on another label set. A net built with ``num_classes=0`` has no classifier
            and always drops it.

    Raises:
        WeightsError: unreadable or unsafe file, unknown name, backbone-name or key/shape mismatch.
    """
    state, meta = read_state_dict(source, getattr(net, "name", None))
    report = apply_weights(
        net,
        backbone_state(state, meta.get("backbone_keys")),
        what=f"weights={str(source)!r}",
        ignore_head=ignore_head,
        checkpoint_backbone=meta.get("checkpoint_backbone"),
        architecture=meta.get("architecture"),
    )
    report.source = str(source)
    return report


def save_weights(net: nn.Module, path: str | Path) -> Path:
    """Write ``net``'s weights as ``.safetensors`` (no pickle at all) or, for any other suffix, a ``.pth``.

    ``num_batches_tracked`` counters are kept; tensors are made contiguous, as safetensors requires. A
    ``.safetensors`` file records the zoo name and the builder options (``architecture``), so loading it
    into a network built otherwise is refused; a ``.pth`` is a bare state dict, as torchvision's are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        import json

        from safetensors.torch import save_file

        metadata = {"backbone": str(getattr(net, "name", ""))}
        if getattr(net, "architecture", None):
            metadata["architecture"] = json.dumps(net.architecture)
        save_file(state, str(path), metadata=metadata)
    else:
        torch.save(state, path)
    return path
