#!/usr/bin/env python
"""Export a training checkpoint: ``python tools/convert.py export --checkpoint RUN/checkpoints/latest --out DIR``;
import a released Eso-LM checkpoint: ``python tools/convert.py import --reference CKPT --out DIR --tokenizer JSON``.

A thin wrapper over esolm_dist.convert_cli (also installed as ``esolm-convert``).
"""

import sys

from esolm_dist.convert_cli import main

if __name__ == "__main__":
    sys.exit(main())
