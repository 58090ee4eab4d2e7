"""Evaluate LGCN: python run_eval.py --split common [--workdir ckpt | --checkpoint NAME] (the lgcn-eval command)."""

import sys

from lgcn_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
