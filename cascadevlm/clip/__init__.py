"""CLIP stage: open_clip loading, zero-shot head, feature cache, adapters, the LightningModule."""
