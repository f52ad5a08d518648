"""deeplab-cli: DeepLab-LargeFOV semantic segmentation from the command line."""

__version__ = "0.1.0"
