"""Train LGCN: python run_train.py --workdir ckpt [--preset paper] [--config train.num_steps=2000 ...] (the lgcn-train command)."""

import sys

from lgcn_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
