"""The 2015 entries' inference pieces composed for one detector (or an ensemble of them): what
``--model.box_refinement``, ``--model.multiscale_testing``, ``--model.ensemble`` and ``--model.tta`` turn on
(``tasks.heads.refinement``, ``tasks.heads.multiscale``, ``tasks.heads.ensemble``, ``tasks.heads.tta``).

Refinement and multi-scale testing compose (both passes read the pyramid), as the paper's Table 9 stacks
them; TTA composes with refinement (each view refined); an ensemble combines its members' heads on one view
and takes none of the others; multi-scale testing and TTA are two kinds of multi-scale testing and are not
combined. Off, it is the detector's own call.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .ensemble import detect_ensemble
from .multiscale import TARGET, detect_multiscale
from .refinement import detect_refined
from .tta import detect_with_tta


def detect_with(detector, images: list[Tensor], *, box_refinement: bool = False,
                pyramid: Sequence[int] | None = None, tta: tuple[Sequence[float], bool] | None = None,
                members: Sequence | None = None, target: float = TARGET) -> list[dict[str, Tensor]]:  # fmt: skip
    """``images`` detected by ``detector`` (or by the ensemble of ``members``' detectors) with the pieces
    given (``target``: multi-scale testing's region size); outputs as the detector's own."""
    if members and (tta or box_refinement or pyramid):
        raise ValueError(
            "model.ensemble combines its members' heads on one view: drop tta, box_refinement and multiscale_testing"
        )
    if pyramid and tta:
        raise ValueError("model.multiscale_testing and model.tta are two kinds of multi-scale testing: pick one")
    if members:
        return detect_ensemble(list(members), images)
    run = detector
    if box_refinement:
        run = lambda views: detect_refined(detector, views, pyramid=pyramid, target=target)  # noqa: E731
    elif pyramid:
        run = lambda views: detect_multiscale(detector, views, pyramid, target)  # noqa: E731
    return detect_with_tta(detector, images, *tta, run=run) if tta else run(images)
