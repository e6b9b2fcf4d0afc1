"""DP-SGD training around the compiler: noise and the optimizer step (`optim`), Poisson sampling
(`sampling`), privacy accounting (`accounting`), data sets (`data`), data-parallel training
(`distributed`) and the `fxclip train` job (`train`).

These modules use nothing of the compiler but the shared argument checks (`fxclip.checks`) and
errors, except `train`, the job that calls `fxclip.transform` on zoo models (tests/test_layers.py
holds this). Their documented paths `fxclip.optim`, `fxclip.accounting`, ... are re-exports.
"""
