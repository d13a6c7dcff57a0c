"""Train few-shot adapters: ``python train.py fit --config configs/train/<file>.yaml`` (LightningCLI)."""

from cascadevlm.cli import train_main

if __name__ == "__main__":
    train_main()
