"""gpu-session: chat privately with any open model on a rented GPU.

Layers, each importing only those below it (tests/unit/test_layers.py): cli → session → chat →
stack → providers → local → host → sizing → clouds → errors, paths. The simulator (sim/) sits
beside them: it may import the product, and only cli and the tests import it. README: Architecture.
"""

__version__ = "0.1.0"
