"""`python -m ntt ...` is the `ntt` command (ntt/cli.py): `python -m ntt run ...`, `torchrun -m ntt study ...`."""

import sys

from ntt.cli import main

sys.exit(main())
