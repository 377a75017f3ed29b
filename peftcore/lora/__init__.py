"""LoRA / DoRA: the config, the layers (and the Adapter Protocol), initialisation, injection,
modules_to_save copies, merging onto quantized bases, pruning."""
