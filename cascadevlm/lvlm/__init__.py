"""LVLM stage: prompts, answer parsing, candidate scoring, backends, LoRA."""
