"""wsi-screen: whole-slide screening of cervical cytology.

Importing the package is cheap: it touches neither the disk, the network nor torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
