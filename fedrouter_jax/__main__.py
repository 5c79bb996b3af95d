import sys

from fedrouter_jax.cli import main

sys.exit(main())
