"""Model definitions: ViT backbone and the SiT heads."""
