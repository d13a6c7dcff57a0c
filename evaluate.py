"""Evaluate the cascade: `python evaluate.py --config configs/demo.yaml [--dotted.key value ...]`."""

from cascadevlm.cli import evaluate_main as main

if __name__ == "__main__":
    main()
