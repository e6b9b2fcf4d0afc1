"""fxclip.optim, the documented path of `fxclip.dp.optim` (DP-SGD training lives in fxclip/dp/)."""
from .dp.optim import *  # noqa: F401,F403
