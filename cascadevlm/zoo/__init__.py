"""Demo models: tiny random-weight builders of real architectures (tests, benches) and the small models
trained here on real photos (the demo's default), with their manifest and pretraining script.

The product's loading code takes paths and tags and never imports this package.
"""
