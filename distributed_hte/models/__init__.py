"""Pure PyTorch modules and losses, one module per kind. No ray import here."""
