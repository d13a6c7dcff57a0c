"""The gate rule and routing: pure functions of CLIP's outputs and prediction records.

Below both ``cascade/`` (which applies them while evaluating) and ``report/`` (which sweeps them over a
run's records), so neither has to import the other for them.
"""
