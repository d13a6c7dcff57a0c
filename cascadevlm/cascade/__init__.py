"""The cascade: gate, evaluation loop, sweeps (the only place CLIP and LVLM meet)."""
