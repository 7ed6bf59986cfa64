"""The papers' key experiments (``python -m studies``) and the ``GradientFlow`` diagnostics callback."""

from .catalog import STUDIES, Study, Variant
from .gradient_flow import GradientFlow, UnitProbe

__all__ = ["STUDIES", "GradientFlow", "Study", "UnitProbe", "Variant"]
