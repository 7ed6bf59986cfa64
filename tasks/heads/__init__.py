"""Plain ``nn.Module`` heads over a zoo backbone: Faster R-CNN (C4, FPN), FCN, localization, test-time
augmentation and the modules whole-model export traces. No Lightning, nothing else from ``tasks``."""
