"""fxclip.data, the documented path of `fxclip.dp.data` (DP-SGD training lives in fxclip/dp/)."""
from .dp.data import *  # noqa: F401,F403
