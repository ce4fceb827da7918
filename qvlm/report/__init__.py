"""The self-contained HTML report: page assembly, plots, SVG, CSS."""

from qvlm.report.page import *  # noqa: F401,F403
from qvlm.report.page import __all__ as __all__  # noqa: F401
