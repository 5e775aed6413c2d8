"""Backbones (ResNet from torchvision, ViT on ``F.scaled_dot_product_attention``) and necks."""
