"""Train few-shot adapters (LightningCLI): ``python train.py fit --config configs/method/<method>.yaml
--data configs/data/<dataset>.yaml``; ``python train.py test ... --ckpt_path <run>/checkpoints/best.ckpt``."""

from cascadevlm.cli import train_main

if __name__ == "__main__":
    train_main()
