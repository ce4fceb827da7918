"""Ground truth: exact soft and hard optima of small token MDPs (:mod:`qvlm.exact.solver`) and the
learners scored against them (:mod:`qvlm.exact.learners`)."""

from qvlm.exact.solver import *  # noqa: F401,F403
from qvlm.exact.solver import __all__ as __all__  # noqa: F401
