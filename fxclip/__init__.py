"""fxclip: fast per-example gradient clipping for DP-SGD, as a torch.fx graph rewrite."""
