"""``lightning_port.serve`` moved to :mod:`lightning_port.serving.score` (``tsa-score``) and
:mod:`lightning_port.serving.calibration` (the endpoint's ``percentile_score`` / ``probability_score``); this
path re-exports their public names."""

import sys

from .serving.calibration import *  # noqa: F403
from .serving.score import *  # noqa: F403

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # noqa: F405
