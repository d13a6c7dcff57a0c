"""Evaluate the cascade: `python evaluate.py --config configs/demo.yaml [--dotted.key value ...]`."""

from cascadevlm.cascade.evaluate import main

if __name__ == "__main__":
    main()
