"""Test and benchmark helpers: real sample photos and miniature raw benchmark trees."""
