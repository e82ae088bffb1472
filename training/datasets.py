"""Old import path of the dataset readers, which now live in the core: `dimml.datasets`."""
from dimml.datasets import *  # noqa: F401,F403
from dimml.datasets import __all__  # noqa: F401
