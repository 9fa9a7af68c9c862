"""Training, fine-tuning, evaluation and prediction on resnet_fast models:
what the `resnet-fast` command runs (see resnet_fast.cli)."""
