"""fxclip.train, the documented path of `fxclip.dp.train` (DP-SGD training lives in fxclip/dp/)."""
from .dp.train import *  # noqa: F401,F403
