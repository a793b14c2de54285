"""``python -m ckpt_wrapper COMMAND``: the ``ckpt-wrapper`` command (see ``ckpt_wrapper.tools.cli``)."""

import sys

from ckpt_wrapper.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
