"""Drop-in use of fxclip from other training code: `engine` (`fxclip.PrivacyEngine`, Opacus's
names for an unchanged PyTorch loop) and `transformers` (a Hugging Face `Trainer` with DP-SGD;
needs the `hf` extra). Nothing here is imported by the compiler or by fxclip.dp."""
