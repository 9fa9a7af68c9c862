"""resnet_fast benchmarks: `python -m benchmarks --help`."""
