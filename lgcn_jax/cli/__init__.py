"""The command-line programs: ``lgcn-detect`` (``cli.detect``), ``lgcn-extract`` (``cli.extract``), ``lgcn-train`` (``cli.train``, also
``python run_train.py``) and ``lgcn-eval`` (``cli.eval``, also ``python run_eval.py``).

Each parses its flags, sets up logging and progress bars, and calls the library; nothing else."""
