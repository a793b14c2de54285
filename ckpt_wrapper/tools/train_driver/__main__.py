"""``python -m ckpt_wrapper.tools.train_driver``: see the package's docstring."""

import sys

from ckpt_wrapper.tools.train_driver.loop import main

if __name__ == "__main__":
    sys.exit(main())
