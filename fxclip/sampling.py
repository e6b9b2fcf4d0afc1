"""fxclip.sampling, the documented path of `fxclip.dp.sampling` (DP-SGD training lives in fxclip/dp/)."""
from .dp.sampling import *  # noqa: F401,F403
