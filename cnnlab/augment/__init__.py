"""Augmentation: batched ops on the device (batched.py) and the same names per image through
torchvision.transforms.v2 (per_image.py)."""
