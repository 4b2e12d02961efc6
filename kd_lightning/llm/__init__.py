"""Language-model distillation: token-level losses, on/off-policy training, black-box sequence-level KD."""
