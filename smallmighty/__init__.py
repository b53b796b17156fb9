"""smallmighty: make small language models real.

Train, distill, compress, evaluate and serve small models on a CPU. Each `slm <verb>` command is a
thin wrapper over a function in this package, so everything the CLI does is also a Python API.
"""

__version__ = "0.1.0"
