"""``python -m eplb_jax``: the ``eplb-jax`` command line."""

from eplb_jax.cli import main

raise SystemExit(main())
