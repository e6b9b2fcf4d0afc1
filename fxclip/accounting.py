"""fxclip.accounting, the documented path of `fxclip.dp.accounting` (DP-SGD training lives in fxclip/dp/)."""
from .dp.accounting import *  # noqa: F401,F403
