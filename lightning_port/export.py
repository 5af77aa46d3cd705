"""``lightning_port.export`` moved to :mod:`lightning_port.serving.export` (``tsa-export-onnx``) and
:mod:`lightning_port.serving.runtime` (the ONNX Runtime plumbing); this path re-exports their public names."""

import sys

from .serving.export import *  # noqa: F403
from .serving.runtime import *  # noqa: F403

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # noqa: F405
