"""Every training mode, for tests and for trying combinations: ``ckpt_wrapper.tools.train_driver``.

    python scripts/launch/train_driver.py --help
    torchrun --nproc_per_node 2 scripts/launch/train_driver.py --parallel fsdp1 --ac-order after --every 2

The short example to copy is ``train.py`` beside this file.
"""

import sys

from ckpt_wrapper.tools.train_driver import main

if __name__ == "__main__":
    sys.exit(main())
