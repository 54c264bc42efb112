# Same interface as _kernels (see _kernels.pyi); built for another instruction set.
from ._kernels import *  # noqa: F401,F403
