"""``python -m mllmcal ...`` (and ``torchrun -m mllmcal ...``): the command line."""

from mllmcal.cli import main

raise SystemExit(main())
